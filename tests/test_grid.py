"""wb grid end to end on toy checkpoints (64 px, 3 steps): the issue's acceptance run and what it promises."""

import json
import re

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from workbench.checkpoint.describe import describe
from workbench.cli import friendly
from workbench.grids import layout
from workbench.grids.cli import grid
from workbench.grids.plan import GridRequest, make_plan
from workbench.grids.pnginfo import parse_parameters, read_parameters
from workbench.grids.render import PromptCache, denoise, render_cells
from workbench.grids.run import cell_fields, checkpoint_hashes
from workbench.pipeline import build_pipeline
from workbench.toy.model import TOY_SCHEDULER, toy_init

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def wb():
    app = typer.Typer()
    app.command("grid")(friendly(grid))
    app.command("noop")(lambda: None)  # a second command keeps "grid" a subcommand, as in wb
    return app


def run(*args):
    return CliRunner().invoke(wb(), ["grid", *map(str, args)])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # This 2-core machine is shared: torch's two OpenMP threads wait on each other whenever one is
    # descheduled, and these tests ran 2-4x slower for it. One thread gives the same pixels, steadily.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    a = toy_init(folder / "a.safetensors", seed=1)
    b = toy_init(folder / "b.safetensors", seed=2)
    prompts = folder / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return folder, a, b, prompts


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "wb-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "wb-tiny-clip.json")
    torch.save(open_clip.create_model("wb-tiny-clip").state_dict(), folder / "weights.pt")
    return folder / "weights.pt"


@pytest.fixture(scope="module")
def runs(toys, tiny_clip):
    """The acceptance command run twice, and once more with --batch 1 and a (tiny) CLIP model."""
    folder, a, b, prompts = toys
    base = ["--ckpts", f"{a},{b}", "--prompts", prompts, "--seeds", "1,2", "--steps", "3", "--size", "64x64"]
    first = run(*base, "-o", folder / "g")
    assert first.exit_code == 0, first.output
    again = run(*base, "-o", folder / "g-again")
    assert again.exit_code == 0, again.output
    batch1 = run(*base, "--batch", "1", "--clip-model", "wb-tiny-clip", "--clip-weights", tiny_clip,
                 "-o", folder / "g-batch1")  # fmt: skip
    assert batch1.exit_code == 0, batch1.output
    return {"g": first, "g-again": again, "g-batch1": batch1, "folder": folder}


def cells_of(folder):
    return sorted((folder / "cells").glob("*.png"))


def test_acceptance_writes_grid_and_eight_different_cells_with_parameters(toys, runs):
    folder, a, b, _ = toys
    out = folder / "g"
    assert (out / "grid.png").is_file() and (out / "grid.json").is_file() and (out / "index.html").is_file()
    cells = cells_of(out)
    assert [c.name for c in cells] == [f"{i:04d}.png" for i in range(8)]
    images = [pixels(c) for c in cells]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert len({im.tobytes() for im in images}) == 8  # 8 different images
    hashes = {describe(a).autov2: "a", describe(b).autov2: "b"}
    data = json.loads((out / "grid.json").read_text())
    for path, cell in zip(cells, data["cells"], strict=True):
        info = parse_parameters(read_parameters(path))
        assert info["prompt"] == cell["prompt"] and info["prompt"] in PROMPTS
        assert info["negative_prompt"] == ""
        assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Size"]) == (
            "3",
            "Euler a",
            "7",
            "64x64",
        )
        assert info["Seed"] == str(cell["seed"]) and info["Seed"] in ("1", "2")
        assert hashes[info["Model hash"]] == info["Model"]  # the AutoV2 of the file named by its stem
        assert cell["parameters"] == read_parameters(path)
    assert "CLIP score skipped" in runs["g"].output
    assert "8 cells = 8 images, 24 denoising steps" in runs["g"].output


def test_identical_pixels_when_run_again_and_in_another_batch_size(runs):
    folder = runs["folder"]
    for other in ("g-again", "g-batch1"):  # batch 4 vs 4, and 4 vs 1 (euler_a: per-step noise too)
        for mine, theirs in zip(cells_of(folder / "g"), cells_of(folder / other), strict=True):
            assert np.array_equal(pixels(mine), pixels(theirs)), (other, mine.name)
    assert pixels(folder / "g" / "grid.png").tobytes() == pixels(folder / "g-again" / "grid.png").tobytes()


def test_grid_layout_places_every_cell_under_its_labels(runs):
    out = runs["folder"] / "g"
    data = json.loads((out / "grid.json").read_text())
    grid_image = pixels(out / "grid.png")
    plan_geo = layout.geometry(cols=2, rows=2, subgrids=2, cell_w=64, cell_h=64)
    # columns x rows x sub-grids, plus the label margins
    assert grid_image.shape[1] == 2 * (2 * 64 + plan_geo.label_w) + plan_geo.gap
    assert grid_image.shape[0] == plan_geo.title_h + plan_geo.band_h + 2 * 64
    assert [data["axes"][p]["kind"] for p in "xyz"] == ["checkpoint", "prompt", "seed"]
    assert data["axes"]["x"]["labels"] == ["a", "b"] and data["axes"]["z"]["labels"] == ["Seed: 1", "Seed: 2"]
    for cell in data["cells"]:
        left, top, right, bottom = plan_geo.cell_box(cell["x"], cell["y"], cell["z"])
        assert np.array_equal(grid_image[top:bottom, left:right], pixels(out / cell["file"])), cell["file"]
    # The label bands hold ink (text), the gap between sub-grids none.
    assert (grid_image[: plan_geo.title_h + plan_geo.band_h] < 128).any()
    gap = grid_image[:, plan_geo.subgrid_w : plan_geo.subgrid_w + plan_geo.gap]
    assert (gap == 255).all()


def test_checkpoint_axis_changes_pixels(runs):
    data = json.loads((runs["folder"] / "g" / "grid.json").read_text())
    by_pos = {(c["x"], c["y"], c["z"]): c["file"] for c in data["cells"]}
    out = runs["folder"] / "g"
    for y in range(2):
        for z in range(2):
            a, b = pixels(out / by_pos[0, y, z]), pixels(out / by_pos[1, y, z])
            assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_in_place_weight_switch_matches_a_pipeline_built_for_that_checkpoint(toys, runs):
    _, a, b, _ = toys
    data = json.loads((runs["folder"] / "g" / "grid.json").read_text())
    assert data["render"]["pipelines_built"] == 1  # b was loaded into a's pipeline
    assert sorted(data["render"]["reloaded"][str(b)]) == ["text_encoder", "unet", "vae"]
    fresh = make_plan(
        GridRequest(checkpoints=[b], prompts=[PROMPTS[1]], seeds=[2], steps=[3], width=64, height=64)
    )
    result = render_cells(fresh, device="cpu")
    cell = next(
        c for c in data["cells"] if c["checkpoint"] == "b" and c["prompt"] == PROMPTS[1] and c["seed"] == 2
    )
    assert np.array_equal(np.asarray(result.images[0]), pixels(runs["folder"] / "g" / cell["file"]))


def test_a_folder_checkpoint_has_no_model_hash_in_png_info(toys, tmp_path):
    # A diffusers folder has no file to hash; A1111 then leaves "Model hash" out, and so does wb.
    _, a, _, _ = toys
    (tmp_path / "model").mkdir()
    assert checkpoint_hashes(tmp_path / "model") == (None, None)
    assert checkpoint_hashes(a)[1] == describe(a).autov2
    cell = make_plan(
        GridRequest(checkpoints=[a], prompts=["p"], seeds=[1], steps=[3], width=64, height=64)
    ).cells[0]
    assert "Model hash" not in cell_fields(cell, None) and cell_fields(cell, "abc")["Model hash"] == "abc"


def final_latents(pipe, plan, batch):
    """The denoised latents of every cell, sampled `batch` cells per pipeline call."""
    prompts, cells, out = PromptCache(pipe, "cpu"), plan.cells, []
    with torch.inference_mode():
        for i in range(0, len(cells), batch):
            out.append(denoise(pipe, cells[i : i + batch], TOY_SCHEDULER, "cpu", torch.float32, prompts))
    return torch.cat(out)


@pytest.mark.parametrize(
    "sampler, cfg",
    [("euler_a", 7.0), ("dpm++2m_karras", 5.0), ("euler", 1.0)],  # ancestral; multistep; no CFG
)
def test_batch_size_never_changes_a_cells_latent_by_a_bit(toys, sampler, cfg):
    # Sharper than pixels: float latents, bit for bit. Each of render.py's measures is needed here
    # (without the row-wise linears or the lone-cell rule these differ by ~1e-5).
    _, a, _, _ = toys
    plan = make_plan(GridRequest(checkpoints=[a], prompts=PROMPTS, seeds=[3, 1], steps=[2], cfgs=[cfg],
                                 samplers=[sampler], width=64, height=64))  # fmt: skip
    pipe = build_pipeline(a)
    together = final_latents(pipe, plan, batch=4)
    assert torch.equal(together, final_latents(pipe, plan, batch=1))
    assert torch.equal(together, final_latents(pipe, plan, batch=3))


def test_same_cell_twice_gives_the_same_pixels(toys):
    _, a, _, _ = toys
    plan = make_plan(GridRequest(checkpoints=[a], prompts=[PROMPTS[0]], seeds=[3, 1, 3], steps=[3],
                                 samplers=["dpm++2m_karras"], width=64, height=64))  # fmt: skip
    together = render_cells(plan, batch=3, device="cpu").images
    alone = render_cells(plan, batch=1, device="cpu").images
    for i in range(3):
        assert np.array_equal(np.asarray(together[i]), np.asarray(alone[i])), i
    assert np.array_equal(np.asarray(together[0]), np.asarray(together[2]))  # seed 3 twice
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))


def test_outputs_json_html_and_clip_scores(runs):
    folder = runs["folder"]
    data = json.loads((folder / "g" / "grid.json").read_text())
    assert all(c["scores"]["clip"] is None and 0 <= c["scores"]["burn"] <= 100 for c in data["cells"])
    scored = json.loads((folder / "g-batch1" / "grid.json").read_text())
    assert all(0 <= c["scores"]["clip"] <= 100 for c in scored["cells"])
    assert scored["scores"]["clip"]["model"] == "wb-tiny-clip"
    assert "CLIP score with wb-tiny-clip" in runs["g-batch1"].output
    html = (folder / "g-batch1" / "index.html").read_text()
    assert '<img class="grid" src="grid.png"' in html
    for cell in scored["cells"]:
        assert f'src="{cell["file"]}"' in html
    assert "Model hash: " in html and "<script>" in html and "data-col" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external assets


def test_dry_run_prints_the_plan_and_renders_nothing(toys, tmp_path):
    _, a, b, prompts = toys
    result = run("--ckpts", f"{a},{b}", "--prompts", prompts, "--seeds", "1-4", "--cfg", "5,7",
                 "--x", "cfg", "--y", "seed", "--z", "checkpoint", "--dry-run")  # fmt: skip
    assert result.exit_code == 2 and "--prompts: several values but no free axis" in result.output
    result = run("--ckpts", f"{a},{b}", "--prompts", prompts, "--seeds", "1-4", "--sr", "red,green",
                 "--steps", "3", "--size", "64x64", "--dry-run", "-o", tmp_path / "g")  # fmt: skip
    assert result.exit_code == 2 and "several values but no free axis" in result.output
    result = run("--ckpts", f"{a},{b}", "--prompts", prompts, "--seeds", "1-4", "--steps", "3",
                 "--size", "64x64", "--dry-run", "-o", tmp_path / "g")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "16 cells = 16 images, 48 denoising steps" in result.output and "MP" in result.output
    assert "dry run: nothing rendered" in result.output and not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--size", "64x60"], "--size"),
        (["--seeds", "one"], "--seeds"),
        (["--cfg", "5-9 (-1)"], "--cfg"),
        (["--sampler", "nope"], "--sampler"),
        (["--batch", "0"], "--batch"),
        (["--x", "colour"], "--x"),
        (["--clip-weights", "/nonexistent/w.pt"], "--clip-weights"),
        (["--device", "tpu"], "--device"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(toys, tmp_path, args, flag):
    _, a, _, prompts = toys
    result = run("--ckpts", a, "--prompts", prompts, "--steps", "3", "-o", tmp_path / "g", *args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error:") and flag in line and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()


def test_missing_inputs_name_their_flag(toys, tmp_path):
    _, a, _, prompts = toys
    result = run("--ckpts", tmp_path / "nope.safetensors", "--prompts", prompts, "-o", tmp_path / "g")
    assert result.exit_code == 2 and "--ckpts" in result.output and "no such file" in result.output
    result = run("--ckpts", a, "--prompts", tmp_path / "none.txt", "-o", tmp_path / "g")
    assert result.exit_code == 2 and "--prompts" in result.output
    result = run("--ckpts", a, "--prompts", prompts)
    assert result.exit_code == 2 and "-o/--out" in result.output
