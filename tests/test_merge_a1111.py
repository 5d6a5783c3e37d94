"""wb merge against A1111's run_modelmerger (modules/extras.py), its rules written out by hand:
which keys are merged (every key whose name contains "model" and that B, and C, also have: the
VAE and the EMA included), which dtype each output tensor has with "save as float16", "No
interpolation" (wb merge copy) with a baked VAE, and "Discard weights with matching name"."""

import json
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.cli import friendly
from workbench.merge.cli import merge_app
from workbench.merge.copy import copy_checkpoint
from workbench.merge.engine import merge
from workbench.merge.recipe import from_json, single_step

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
POS = TE + "embeddings.position_ids"


def sd1(seed: int) -> dict[str, torch.Tensor]:
    """A tiny SD1-layout checkpoint in float32 with a VAE, an EMA and the scheduler buffers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g)

    return {
        U + "input_blocks.0.0.weight": r(8, 4, 3, 3),
        U + "time_embed.0.weight": r(32, 8),
        U + "out.2.weight": r(4, 8, 3, 3),
        TE + "embeddings.token_embedding.weight": r(300, 8),
        TE + "final_layer_norm.weight": r(8),
        POS: torch.arange(77, dtype=torch.int64)[None],
        "first_stage_model.decoder.conv_out.weight": r(3, 8, 3, 3),
        "first_stage_model.encoder.conv_out.bias": r(8),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelout2weight": r(4, 8, 3, 3),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 1000),
        "betas": torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64),
    }


@pytest.fixture
def abc(tmp_path):
    tensors = [sd1(i + 1) for i in range(3)]
    paths = [save_tensors(tmp_path / f"{n}.safetensors", t) for n, t in zip("abc", tensors, strict=True)]
    return paths, tensors


def read(path):
    with open_checkpoint(path) as ck:
        return {k: ck[k].clone() for k in ck}


def to_half(t):  # A1111's to_half: float32 only
    return t.half() if t.dtype == torch.float32 else t


def a1111_weighted(A, B, alpha):
    """run_modelmerger's Weighted sum with save_as_half (integer tensors aside: never merged in wb)."""
    out = {}
    for k, a in A.items():
        if "model" in k and k in B and k != POS and a.is_floating_point():
            out[k] = to_half((1 - alpha) * a + alpha * B[k])
        else:
            out[k] = a
    return out


def a1111_add_difference(A, B, C, alpha):
    diff = {}
    for k, b in B.items():  # B - C for "model" keys; zeros where C lacks the key
        diff[k] = (b - C[k] if k in C else torch.zeros_like(b)) if "model" in k and k != POS else b
    out = {}
    for k, a in A.items():
        if "model" in k and k in diff and k != POS and a.is_floating_point():
            out[k] = to_half(a + alpha * diff[k])
        else:
            out[k] = a
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert torch.equal(got[k], want[k]), k


def test_weighted_merge_is_a1111s_bit_for_bit_vae_and_ema_included(tmp_path, abc):
    (a, b, _), (ta, tb, _) = abc
    out = tmp_path / "w.safetensors"
    merge(single_step("weighted", [a, b], {"alpha": 0.3}, dtype="fp16"), out)
    got = read(out)
    assert_same(got, a1111_weighted(ta, tb, 0.3))
    assert got["alphas_cumprod"].dtype == torch.float32 and got["betas"].dtype == torch.float64
    assert got["first_stage_model.decoder.conv_out.weight"].dtype == torch.float16
    assert got["model_ema.num_updates"].dtype == torch.int32  # integers are never merged (A1111 would)


def test_add_difference_merge_is_a1111s_bit_for_bit(tmp_path, abc):
    (a, b, c), (ta, tb, tc) = abc
    out = tmp_path / "ad.safetensors"
    merge(single_step("add-diff", [a, b, c], {"alpha": 0.7}, dtype="fp16"), out)
    assert_same(read(out), a1111_add_difference(ta, tb, tc, 0.7))


def test_vae_from_a_keeps_the_earlier_key_set(tmp_path, abc):
    (a, b, _), (ta, tb, _) = abc
    out = tmp_path / "old.safetensors"
    result = merge(single_step("weighted", [a, b], {"alpha": 0.3}, dtype="fp16", vae_from="A"), out)
    got = read(out)
    for k in ("first_stage_model.decoder.conv_out.weight", "model_ema.diffusion_modelout2weight"):
        assert torch.equal(got[k].float(), ta[k].half().float()), k  # A's, cast to the output dtype
    unet = U + "out.2.weight"
    assert torch.equal(got[unet], (0.7 * ta[unet] + 0.3 * tb[unet]).half())
    recorded = json.loads(result.metadata["wb.merge_recipe"])
    assert recorded["vae_from"] == "A" and from_json(result.metadata["wb.merge_recipe"], "x").vae_from == "A"
    # A recipe recorded before the field existed replays with the key set it was made with.
    del recorded["vae_from"]
    assert from_json(json.dumps(recorded), "old file").vae_from == "A"


def test_discard_and_config_source_as_a1111_writes_them(tmp_path, abc):
    (a, b, _), (ta, tb, _) = abc
    out = tmp_path / "d.safetensors"
    result = merge(single_step("weighted", [a, b], {"alpha": 0.5}, discard=r"^model_ema\."), out)
    got = read(out)
    assert not any(k.startswith("model_ema.") for k in got) and "alphas_cumprod" in got
    want = {k: v for k, v in a1111_weighted(ta, tb, 0.5).items() if not re.search(r"^model_ema\.", k)}
    assert_same(got, want)
    recipe = json.loads(result.metadata["sd_merge_recipe"])
    assert recipe["config_source"] == 0 and recipe["discard_weights"] == r"^model_ema\."
    assert recipe["interp_method"] == "Weighted sum"


def a1111_no_interpolation(A, vae, save_as_half, discard=None):
    out = dict(A)
    for k, v in vae.items():
        if "first_stage_model." + k in out:
            out["first_stage_model." + k] = to_half(v) if save_as_half else v
    if save_as_half:
        out = {k: to_half(v) for k, v in out.items()}
    if discard:
        out = {k: v for k, v in out.items() if not re.search(discard, k)}
    return out


def test_copy_bakes_the_vae_converts_and_discards_as_a1111(tmp_path, abc):
    (a, _, _), (ta, _, _) = abc
    vae = {"decoder.conv_out.weight": torch.full((3, 8, 3, 3), 0.25), "encoder.conv_out.bias": torch.ones(8)}
    vae_file = save_tensors(tmp_path / "v.vae.safetensors", vae)
    out = tmp_path / "copy.safetensors"
    result = copy_checkpoint(a, out, bake_vae=vae_file, dtype="fp16", discard="betas")
    assert_same(read(out), a1111_no_interpolation(ta, vae, True, "betas"))
    assert result.baked == 2 and result.dropped == ["betas"]
    recipe = json.loads(result.metadata["sd_merge_recipe"])
    assert (recipe["interp_method"], recipe["bake_in_vae"], recipe["save_as_half"]) == (
        "No interpolation", "v.vae.safetensors", True,
    )  # fmt: skip
    pruned = copy_checkpoint(a, tmp_path / "p.safetensors", prune_ema=True)
    assert not any(k.startswith("model_ema.") for k in read(pruned.path))
    assert_same(read(pruned.path), {k: v for k, v in ta.items() if "model_ema" not in k})


def wb():
    app = typer.Typer()
    app.add_typer(merge_app, name="merge")
    app.command("noop")(friendly(lambda: None))
    return app


def test_cli_copy_vae_from_and_discard(tmp_path, abc):
    (a, b, _), (ta, tb, _) = abc
    run = CliRunner().invoke
    res = run(wb(), ["merge", "weighted", str(a), str(b), "-o", str(tmp_path / "o.safetensors"),
                     "--vae-from", "A", "--discard", "alphas"])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = read(tmp_path / "o.safetensors")
    assert "alphas_cumprod" not in got
    vae = "first_stage_model.encoder.conv_out.bias"
    assert torch.equal(got[vae], ta[vae].half())
    res = run(wb(), ["merge", "copy", str(a), "-o", str(tmp_path / "c.safetensors"), "--prune-ema"])
    assert res.exit_code == 0 and "left out" in res.output, res.output
    x, y = str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")
    for args, field in (
        (["merge", "weighted", str(a), str(b), "-o", x, "--discard", "("], "discard"),
        (["merge", "weighted", str(a), str(b), "-o", x, "--vae-from", "B"], "vae_from"),
        (["merge", "copy", str(a), "-o", str(a)], "overwrite"),
        (["merge", "copy", str(a), "-o", y, "--bake-vae", str(b), "--dtype", "fp8"], "--dtype"),
    ):
        res = run(wb(), args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], res.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
