"""`wb lora extract/resize/merge/bake` and `wb inspect` on LoRAs, from the command line; planted
low-rank differences as the known answer; the recipe `lora` step against bake-then-merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from workbench.cli import app
from workbench.lora.synthetic import synthetic_lora
from workbench.toy.model import toy_init
from workbench.toy.tiny import tiny_checkpoint

runner = CliRunner()
K = 4  # the planted rank
U = "model.diffusion_model."


def ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def one_error_line(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """base, a rank-4 LoRA L (alpha 2), tuned = base + 1.0 * L exactly (fp32)."""
    d = tmp_path_factory.mktemp("lcli")
    base = toy_init(d / "base.safetensors")
    lora = synthetic_lora(d / "L.safetensors", base, rank=K, alpha=2.0)
    ok(["lora", "bake", base, f"{lora}:1.0", "--dtype", "fp32", "-o", d / "tuned.safetensors"])
    return d, base, lora, d / "tuned.safetensors"


def _module_diffs(tuned, base):
    """(tuned - base) per LoRA module of the toy: the LDM key and the weight change."""
    t, b = load_file(tuned), load_file(base)
    return {k: (t[k] - b[k]) for k in t if t[k].is_floating_point() and not torch.equal(t[k], b[k])}


def _lora_products(path):
    sd = load_file(path)
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            n = k[: -len(".lora_down.weight")]
            up, down = sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"]
            out[n] = float(sd[f"{n}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    return out


def test_extract_recovers_planted_rank_and_round_trips(planted):
    d, base, lora, tuned = planted
    out = d / "ex.safetensors"
    res = ok(["lora", "extract", tuned, base, "--rank", 6, "--conv-rank", 6, "--dtype", "fp32", "-o", out])
    assert "keeps 100.00%" in " ".join(res.output.split())
    planted_products, got = _lora_products(lora), _lora_products(out)
    assert got.keys() == planted_products.keys() and len(got) == 147
    for n, want in planted_products.items():
        assert float((got[n] - want).norm() / want.norm()) < 1e-5, n
    # bake it back onto the base: the tuned model again
    ok(["lora", "bake", base, out, "--dtype", "fp32", "-o", d / "back.safetensors"])
    back, t = load_file(d / "back.safetensors"), load_file(tuned)
    for k in t:
        if t[k].is_floating_point():
            assert float((back[k] - t[k]).norm()) <= 1e-5 * max(float(t[k].norm()), 1e-12), k


def test_extract_below_rank_is_eckart_young(planted):
    d, base, lora, tuned = planted
    out = d / "ex2.safetensors"
    res = ok(["lora", "extract", tuned, base, "--rank", 2, "--conv-rank", 0, "--dtype", "fp32", "-o", out])
    got = _lora_products(out)
    # the ResNet/sampler share of the planted difference, which kohya's default set leaves out
    energy = {n: float(p.double().pow(2).sum()) for n, p in _lora_products(lora).items()}
    conv = sum(e for n, e in energy.items() if "resnets" in n or "samplers" in n)
    share = f"{conv / sum(energy.values()):.0%} of the difference is in ResNet/sampler convs"
    assert share in " ".join(res.output.split())
    assert len(got) == 102  # attn + te only with --conv-rank 0 (toy: 72 + 30)
    want = _lora_products(lora)
    for n in ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
              "lora_te_text_model_encoder_layers_2_self_attn_v_proj"):  # fmt: skip
        s = torch.linalg.svdvals(want[n].double())
        err = float((got[n].double() - want[n].double()).norm())
        assert err == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-3)
    meta = json.loads(ok(["inspect", "--json", out]).output)
    assert meta["kind"] == "lora" and meta["family"] == "sd1" and meta["groups"]["UNet"]["ranks"] == {"2": 72}
    assert meta["sshs_model_hash"] == meta["sshs_recorded"]
    assert meta["metadata"]["ss_network_dim"] == "2" and meta["metadata"]["ss_base_model_version"] == "sd_v1"


def test_resize_keeps_scale_and_product(planted):
    d, base, lora, tuned = planted
    ok(["lora", "resize", lora, "--rank", 8, "--dtype", "fp32", "-o", d / "r8.safetensors"])
    ok(["lora", "resize", lora, "--rank", 2, "--dtype", "fp32", "-o", d / "r2.safetensors"])
    before, same, small = (
        _lora_products(lora),
        _lora_products(d / "r8.safetensors"),
        _lora_products(d / "r2.safetensors"),
    )
    r2 = load_file(d / "r2.safetensors")
    n = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
    assert (
        r2[f"{n}.lora_down.weight"].shape[0] == 2 and float(r2[f"{n}.alpha"]) == 1.0
    )  # alpha/r kept: 2/4 = 1/2
    for k, want in before.items():
        torch.testing.assert_close(same[k], want, rtol=1e-4, atol=1e-6)
        s = torch.linalg.svdvals(want.double())
        err = float((small[k].double() - want.double()).norm())
        assert err == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-7)
    ok(["lora", "resize", lora, "--fro", "0.9", "--dtype", "fp32", "-o", d / "rf.safetensors"])
    rf = load_file(d / "rf.safetensors")
    for k, want in before.items():
        e = torch.linalg.svdvals(want.double())[:K] ** 2
        share = (e.cumsum(0) / e.sum()).sqrt()
        minimal = int((share < 0.9 - 1e-9).sum()) + 1  # the smallest k keeping 90% of the norm
        assert rf[f"{k}.lora_down.weight"].shape[0] == minimal, k


def test_merge_exact_and_svd(planted, tmp_path):
    d, base, lora, tuned = planted
    other = synthetic_lora(tmp_path / "O.safetensors", base, rank=3, alpha=3.0, seed=7)
    ok(["lora", "merge", f"{lora}:0.7", f"{other}:-0.4", "--dtype", "fp32", "-o", tmp_path / "m.safetensors"])
    a, b, m = _lora_products(lora), _lora_products(other), _lora_products(tmp_path / "m.safetensors")
    for k in a:
        torch.testing.assert_close(m[k], 0.7 * a[k] - 0.4 * b[k], rtol=1e-5, atol=1e-6)
    ok(
        [
            "lora",
            "merge",
            f"{lora}:0.7",
            f"{other}:-0.4",
            "--rank",
            7,
            "--dtype",
            "fp32",
            "-o",
            tmp_path / "m7.safetensors",
        ]
    )
    m7 = _lora_products(tmp_path / "m7.safetensors")
    for k in a:
        torch.testing.assert_close(m7[k], 0.7 * a[k] - 0.4 * b[k], rtol=1e-4, atol=1e-5)


def test_recipe_lora_step_is_bake_then_merge(planted, tmp_path):
    d, base, lora, tuned = planted
    other = toy_init(tmp_path / "other.safetensors", seed=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{base: {base}, other: {other}, photoreal: {lora}}}\n"
        "steps:\n"
        "  baked: {method: lora, inputs: [base, photoreal], strength: 0.6, components: {text_encoder: 0.3}}\n"
        "  mix: {method: weighted, inputs: [baked, other], alpha: 0.25}\n"
        "output: mix\ndtype: fp16\n"
    )
    ok(["merge", "run", recipe, "-o", tmp_path / "one_pass.safetensors"])
    ok(
        [
            "lora",
            "bake",
            base,
            f"{lora}:0.6",
            "--te-strength",
            0.5,
            "--dtype",
            "fp32",
            "-o",
            tmp_path / "b.safetensors",
        ]
    )
    ok(
        [
            "merge",
            "weighted",
            tmp_path / "b.safetensors",
            other,
            "--alpha",
            0.25,
            "-o",
            tmp_path / "two.safetensors",
        ]
    )
    one, two = load_file(tmp_path / "one_pass.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # and the baked file replays bit-identically
    ok(["merge", "replay", tmp_path / "b.safetensors", "-o", tmp_path / "b2.safetensors"])
    b1, b2 = load_file(tmp_path / "b.safetensors"), load_file(tmp_path / "b2.safetensors")
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    shown = ok(["inspect", "--no-hash", tmp_path / "b.safetensors"]).output
    assert "LoRAs baked in" in shown and "L.safetensors" in shown


def test_cli_refusals(planted, tmp_path):
    d, base, lora, tuned = planted
    sdxl = tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    xl_lora = synthetic_lora(tmp_path / "xl_lora.safetensors", sdxl, rank=2, groups=("attn",))
    line = one_error_line(["lora", "bake", base, f"{xl_lora}:0.5", "-o", tmp_path / "o.safetensors"])
    assert "is a LoRA for sdxl" in line and "is sd1: refused before reading any tensor" in line
    assert not (tmp_path / "o.safetensors").exists()
    line = one_error_line(["lora", "extract", sdxl, base, "--rank", 4, "-o", tmp_path / "o.safetensors"])
    assert "is sdxl" in line and "is sd1" in line
    from safetensors.torch import save_file

    stray = {k: v for k, v in load_file(lora).items() if "mid_block_attentions_0_proj_out" in k}
    save_file({**stray, "lora_unet_mid_block.weight_extra": torch.zeros(2)}, tmp_path / "stray.safetensors")
    line = one_error_line(["inspect", tmp_path / "stray.safetensors"])
    assert "key 'lora_unet_mid_block.weight_extra' is not part of a kohya/LyCORIS LoRA module" in line
    line = one_error_line(["lora", "resize", lora, "-o", tmp_path / "o.safetensors"])
    assert "needs --rank R or --fro F" in line
    line = one_error_line(["lora", "bake", base, f"{lora}", "-o", lora])
    assert "refusing to overwrite input" in line
    assert list(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_shipped_photoreal_recipe(planted, tmp_path):
    from pathlib import Path

    d, base, lora, tuned = planted
    dadapt = toy_init(tmp_path / "dadapt.safetensors", seed=5)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "vodka_v4_photoreal.yaml"
    out = tmp_path / "v4_photoreal.safetensors"
    ok(["merge", "run", recipe, "-o", out, "--input", f"v4={base}", "--input", f"dadapt={dadapt}",
        "--input", f"photoreal={lora}"])  # fmt: skip
    got, v4, da, lf = load_file(out), load_file(base), load_file(dadapt), load_file(lora)
    key = U + "output_blocks.0.1.transformer_blocks.0.attn2.to_v.weight"
    n = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    want = (
        0.5 * v4[key] + 0.5 * da[key] + 0.6 * 0.5 * (lf[f"{n}.lora_up.weight"] @ lf[f"{n}.lora_down.weight"])
    )
    assert got[key].dtype == torch.float16
    torch.testing.assert_close(got[key].float(), want, rtol=1e-3, atol=1e-3)
    vae = "first_stage_model.decoder.conv_in.weight"  # A1111's key set: a weighted step merges the VAE too
    assert torch.equal(got[vae], (0.5 * v4[vae].float() + 0.5 * da[vae].float()).half())
