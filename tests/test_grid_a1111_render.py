"""wb grid renders as A1111 computes: guidance at every CFG, variation-seed noise, clip skip, VAE axis,
and the issue's acceptance run with its PNG info and grid infotext (toy model, 32 px, 2 steps)."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.cli import friendly
from workbench.grids.cli import grid
from workbench.grids.noise import cell_noise
from workbench.grids.plan import GridRequest, make_plan
from workbench.grids.pnginfo import read_parameters
from workbench.grids.render import PromptCache, denoise
from workbench.pipeline import build_pipeline
from workbench.text_encode import encode_with_clip_skip
from workbench.toy.model import TOY_SCHEDULER, toy_init

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's infotext pairs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("a1111r")
    a = toy_init(folder / "a.safetensors", seed=1)
    b = toy_init(folder / "b.safetensors", seed=2)
    # A VAE file as A1111 keeps them: the LDM VAE keys without the first_stage_model. prefix.
    with open_checkpoint(b) as ckpt:
        prefix = "first_stage_model."
        vae = {k[len(prefix) :]: ckpt[k] for k in ckpt.keys() if k.startswith(prefix)}
    vae_file = save_tensors(folder / "vae.safetensors", vae, {})
    prompts = folder / "p.txt"
    prompts.write_text("a red circle on a blue background\n")
    return folder, a, b, vae_file, prompts


def hand_guided_latent(pipe, prompt, seed, cfg, steps):
    """A1111's guidance written out: eps = uncond + cfg * (cond - uncond) at every step (Euler, uniform)."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(TOY_SCHEDULER, timestep_spacing="linspace")
    sched.set_timesteps(steps)

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids)[0]

    cond, uncond = embed(prompt), embed("")
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn((1, 4, 16, 16), generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(latent, t)
        eps_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
        latent = sched.step(eps_u + cfg * (eps_c - eps_u), t, latent).prev_sample
    return latent


def test_cfg_0_half_1_and_7_differ_and_follow_a1111s_formula(toys):
    _, a, _, _, _ = toys
    prompt = "a red circle on a blue background"
    pipe = build_pipeline(a)
    assert pipe.unet.config.in_channels == 4 and pipe.vae_scale_factor == 2
    cfgs = [0.0, 0.5, 1.0, 7.0]
    plan = make_plan(GridRequest(checkpoints=[a], prompts=[prompt], seeds=[3], cfgs=cfgs, steps=[2],
                                 samplers=["euler"], width=32, height=32))  # fmt: skip
    cache = PromptCache(pipe, "cpu")
    with torch.inference_mode():
        ours = [denoise(pipe, [c], TOY_SCHEDULER, "cpu", torch.float32, cache)[0] for c in plan.cells]
        theirs = [hand_guided_latent(pipe, prompt, 3, cfg, 2)[0] for cfg in cfgs]
    for cfg, mine, ref in zip(cfgs, ours, theirs, strict=True):
        assert torch.allclose(mine, ref, atol=1e-3, rtol=1e-4), (cfg, (mine - ref).abs().max())
    for i in range(4):
        for j in range(i + 1, 4):
            assert (ours[i] - ours[j]).abs().max() > 0.1, (cfgs[i], cfgs[j])


def a1111_slerp(val, low, high):
    # modules/rng.py's slerp, written out: norms along dim 1 of the (C, H, W) noise; the near-parallel
    # branch mixes low * val + high * (1 - val).
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


@pytest.mark.parametrize("seed, subseed, strength", [(1, 2, 0.3), (42, 7, 1.0), (5, 5, 0.5), (9, 10, 0.0)])
def test_variation_noise_is_a1111s_bit_for_bit(seed, subseed, strength):
    shape = (4, 8, 8)
    torch.manual_seed(seed)  # A1111: torch.manual_seed(seed); torch.randn(shape)
    noise = torch.randn(shape)
    torch.manual_seed(subseed)
    sub = torch.randn(shape)
    expected = noise if strength == 0 else a1111_slerp(strength, noise, sub)
    got = cell_noise(shape, torch.Generator().manual_seed(seed), subseed, strength, "cpu")
    assert got.shape == (1, *shape) and torch.equal(got[0], expected)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(toys):
    from transformers import CLIPTextModel

    _, a, _, _, _ = toys
    te = build_pipeline(a).text_encoder
    ids = torch.tensor([[49406, 320, 1449, 49407] + [49407] * 73])
    # Independent reference: the same encoder with its last layer removed; its normal output is
    # final_layer_norm(the penultimate hidden state) of the full encoder.
    short_cfg = te.config.to_dict() | {"num_hidden_layers": te.config.num_hidden_layers - 1}
    short = CLIPTextModel(type(te.config).from_dict(short_cfg)).eval()
    missing = short.load_state_dict(te.state_dict(), strict=False)
    assert not missing.missing_keys
    with torch.no_grad():
        assert torch.allclose(encode_with_clip_skip(te, ids, 2), short(ids)[0], atol=1e-6)
        assert torch.equal(encode_with_clip_skip(te, ids, 1), te(ids)[0])
        assert not torch.allclose(encode_with_clip_skip(te, ids, 2), te(ids)[0], atol=1e-3)


def wb():
    app = typer.Typer()
    app.command("grid")(friendly(grid))
    app.command("noop")(lambda: None)
    return app


def fields_of(text):
    return dict(RE_PARAM.findall(text.strip().split("\n")[-1]))


def test_acceptance_schedule_cfg_vae_grid_reads_back_in_a1111(toys):
    folder, a, b, vae_file, prompts = toys
    out = folder / "g"
    args = ["grid", "--ckpts", str(a), "--prompts", str(prompts), "--sampler", "DPM++ 2M",
            "--scheduler", "automatic,uniform", "--cfg", "0.5,1,7", "--vae", f"none,{vae_file}",
            "--seeds", "4", "--steps", "2", "--size", "32x32", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(wb(), args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "grid.json").read_text())
    assert [data["axes"][p]["kind"] for p in "xyz"] == ["cfg", "scheduler", "vae"]
    cells = sorted((out / "cells").glob("*.png"))
    assert len(cells) == 12
    pixels = [np.asarray(Image.open(c).convert("RGB")).tobytes() for c in cells]
    assert len(set(pixels)) == 12  # every setting changes the picture
    vae_hash = hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    seen = set()
    for path, cell in zip(cells, data["cells"], strict=True):
        f = fields_of(read_parameters(path))
        fixed = (f["Sampler"], f["Steps"], f["Seed"], f["Size"], f["Model"])
        assert fixed == ("DPM++ 2M", "2", "4", "32x32", "a")
        asked = data["axes"]["y"]["values"][cell["y"]]
        assert f["Schedule type"] == {"automatic": "Karras", "uniform": "Uniform"}[asked]
        assert f["CFG scale"] == ["0.5", "1", "7"][cell["x"]]
        if cell["z"] == 0:
            assert "VAE" not in f and "VAE hash" not in f
        else:
            assert (f["VAE"], f["VAE hash"]) == ("vae.safetensors", vae_hash)
        seen.add((f["Schedule type"], f["CFG scale"], f.get("VAE")))
    assert len(seen) == 12
    main = fields_of(read_parameters(out / "grid.png"))
    assert main["Script"] == "X/Y/Z plot"
    assert (main["X Type"], main["X Values"]) == ("CFG Scale", '"0.5,1,7"')
    assert (main["Y Type"], main["Y Values"]) == ("Schedule type", '"automatic,uniform"')
    assert (main["Z Type"], main["Z Values"]) == ("VAE", f'"none,{vae_file}"')
    subs = sorted((out / "subgrids").glob("*.png"))
    assert len(subs) == 2
    sub1 = fields_of(read_parameters(subs[1]))
    assert "Z Type" not in sub1 and sub1["VAE"] == "vae.safetensors" and sub1["X Type"] == "CFG Scale"
    # A VAE axis swaps the VAE in place: the checkpoint's own one comes back for the "none" cells.
    assert any("vae from" in r for r in data["render"]["reloaded"][str(a)])
    # Four varying kinds do not fit three axes (A1111 has three as well): one line naming the flags.
    four = CliRunner().invoke(wb(), args[:2] + [f"{a},{b}"] + args[3:-2] + ["--dry-run"])
    assert four.exit_code == 2 and "several values but no free axis" in four.output
