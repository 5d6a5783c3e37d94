"""LoRAs in wb grid: A1111 prompt tags, the lora / lora_weight axes, in-place application restored
bit-exactly, the plan's order, PNG info `Lora hashes`, and refusals before any rendering."""

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.grids.lora_apply import LoraState, parse_lora_tags
from workbench.grids.plan import GridRequest, make_plan
from workbench.grids.pnginfo import parse_parameters, read_parameters

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from workbench.lora.synthetic import synthetic_lora
    from workbench.toy.model import toy_init

    root = tmp_path_factory.mktemp("grid-lora")
    base = toy_init(root / "base.safetensors", seed=2)
    other = toy_init(root / "other.safetensors", seed=3)
    (root / "loras").mkdir()
    lora = synthetic_lora(root / "loras" / "style.safetensors", base, rank=4, alpha=2.0, std=0.2, seed=1)
    return {"base": base, "other": other, "lora": lora, "root": root}


def test_prompt_tags_are_parsed_and_stripped_as_a1111_does():
    text = "a <lora:foo:0.5> cat, <lora:bar:1:0.2> <lora:baz:te=0.3:unet=0.7><hypernet:h:1> <lora:plain>"
    clean, tags = parse_lora_tags(text)
    assert clean == "a  cat,   "  # the tags go, every space around them stays
    assert [(t.name, t.te, t.unet) for t in tags] == [
        ("foo", 0.5, 0.5), ("bar", 1.0, 0.2), ("baz", 0.3, 0.7), ("plain", 1.0, 1.0)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="multipliers must be numbers"):
        parse_lora_tags("<lora:x:strong>")


def test_applied_in_place_as_the_bake_formula_and_restored_exactly(files):
    from safetensors.torch import load_file

    from workbench.pipeline import build_pipeline

    pipe = build_pipeline(files["base"])
    original = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()}
                for n in ("unet", "text_encoder", "vae")}  # fmt: skip
    t = load_file(str(files["lora"]))
    state = LoraState(pipe, files["base"])
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.1.conv2"
    fc = "encoder.layers.2.mlp.fc2"

    def delta(name):  # (alpha / r) * up @ down, in the weight's shape
        up, down = t[name + ".lora_up.weight"], t[name + ".lora_down.weight"]
        return (2.0 / 4) * (up.flatten(1) @ down.flatten(1))

    for te, unet in ((0.7, 0.4), (1.0, -0.5)):  # a second set replaces the first (no accumulation)
        assert state.apply(((str(files["lora"]), te, unet),)) is True
        now = {n: getattr(pipe, n).state_dict() for n in ("unet", "text_encoder")}
        w = original["unet"][q + ".weight"]
        assert torch.equal(now["unet"][q + ".weight"], w + unet * delta("lora_unet_" + q.replace(".", "_")))
        w = original["unet"][conv + ".weight"]
        want = w + unet * delta("lora_unet_" + conv.replace(".", "_")).reshape(w.shape)
        assert torch.equal(now["unet"][conv + ".weight"], want)
        w = original["text_encoder"][fc + ".weight"]
        want = w + te * delta("lora_te_text_model_" + fc.replace(".", "_"))
        assert torch.equal(now["text_encoder"][fc + ".weight"], want)
    assert state.apply(()) is True
    for n, sd in original.items():
        now = getattr(pipe, n).state_dict()
        assert all(torch.equal(now[k], v) for k, v in sd.items()), n


def request(files, **kw):
    prompts = kw.pop("prompts", ["a red circle"])
    # the LoRA axes are registered kinds: their values travel in GridRequest.extra
    names = (("lora", "loras"), ("lora_weight", "lora_weights"))
    extra = {kind: kw.pop(name) for kind, name in names if name in kw}
    if extra:
        kw["extra"] = extra
    return GridRequest(checkpoints=kw.pop("checkpoints", [files["base"]]), prompts=prompts, seeds=[1],
                       steps=[2], width=32, height=32, **kw)  # fmt: skip


def test_plan_axes_tags_and_order(files):
    plan = make_plan(request(files, checkpoints=[files["base"], files["other"]],
                             loras=[str(files["lora"]), "none"], lora_weights=[0.0, 1.0]))  # fmt: skip
    kinds = {p: a.kind for p, a in plan.axes.items() if a}
    assert kinds == {"x": "checkpoint", "y": "lora", "z": "lora_weight"}
    assert plan.axes["y"].labels == ["style", "none"]
    assert plan.axes["z"].labels == ["LoRA weight: 0", "LoRA weight: 1"]
    by_index = {c.index: c for c in plan.cells}
    assert by_index[0].prompt == "a red circle <lora:style:0>"
    assert by_index[0].loras == ((str(files["lora"]), 0.0, 0.0),)
    assert by_index[2].prompt == "a red circle" and by_index[2].loras == ()
    # rendering: each checkpoint once, its LoRA sets inside it
    order = [(c.checkpoint, c.loras) for c in plan.render_order()]
    assert [ck for ck, _ in order] == [files["base"]] * 4 + [files["other"]] * 4
    sets = [ls for ck, ls in order if ck == files["base"]]
    assert sets == sorted(sets)  # one switch per LoRA set: same sets are adjacent


def test_prompt_tags_resolve_in_lora_dir(files):
    plan = make_plan(request(files, prompts=["a cat <lora:style:0.8:0.3>"], lora_dirs=[files["lora"].parent]))
    assert plan.cells[0].loras == ((str(files["lora"]), 0.8, 0.3),)
    with pytest.raises(WorkbenchError, match=r"^<lora:nothere>: no LoRA named nothere in the --loras files"):
        make_plan(request(files, prompts=["a cat <lora:nothere:1>"]))


def test_a_lora_of_another_family_is_refused_naming_both(files, tmp_path):
    from workbench.lora.synthetic import synthetic_lora
    from workbench.toy.sdxl import toy_sdxl_init

    xl = toy_sdxl_init(tmp_path / "xl.safetensors")
    xl_lora = synthetic_lora(tmp_path / "xl_lora.safetensors", xl, groups=("attn", "te"))
    with pytest.raises(WorkbenchError) as e:
        make_plan(request(files, loras=[str(xl_lora)]))
    msg = str(e.value)
    assert "xl_lora.safetensors is a LoRA for sdxl" in msg and "base.safetensors is sd1" in msg
    assert "\n" not in msg


def test_lora_weight_needs_loras(files):
    with pytest.raises(WorkbenchError, match=r"^--lora-weight: .*give --loras too"):
        make_plan(request(files, lora_weights=[0.5, 1.0]))


def test_grid_cli_weights_and_png_info(files, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n")
    out = tmp_path / "grid"
    result = runner.invoke(app, [
        "grid", "--ckpts", str(files["base"]), "--prompts", str(prompts), "--seeds", "3", "--steps", "3",
        "--size", "32", "--loras", f"{files['lora']},none", "--lora-weight", "0,0.5,1", "-o", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    # x: lora (style, none), y: weight (0, 0.5, 1): cells 0,2,4 have the LoRA, 1,3,5 none
    pixels = {i: np.asarray(Image.open(out / "cells" / f"{i:04d}.png"), dtype=np.int16) for i in range(6)}
    none = pixels[1]
    assert all(np.array_equal(pixels[i], none) for i in (3, 5))  # exact restore between sets
    assert np.array_equal(pixels[0], none)  # weight 0 is the base
    diff = [np.abs(pixels[i] - none).mean() for i in (0, 2, 4)]
    assert diff[0] == 0 < diff[1] and diff[2] > 0
    params = parse_parameters(read_parameters(out / "cells" / "0004.png"))
    raw = Path(files["lora"]).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert params["prompt"] == "a red circle on a blue background <lora:style:1>"
    assert params["Lora hashes"] == f"style: {hashlib.sha256(raw[8 + n:]).hexdigest()[:12]}"
    assert "Lora hashes" not in parse_parameters(read_parameters(out / "cells" / "0001.png"))


def test_grid_cli_family_mismatch_is_exit_2_before_rendering(files, tmp_path):
    from workbench.lora.synthetic import synthetic_lora
    from workbench.toy.sdxl import toy_sdxl_init

    xl = toy_sdxl_init(tmp_path / "xl.safetensors")
    xl_lora = synthetic_lora(tmp_path / "xl_lora.safetensors", xl, groups=("attn", "te"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "grid"
    result = runner.invoke(app, ["grid", "--ckpts", str(files["base"]), "--prompts", str(prompts),
                                 "--loras", str(xl_lora), "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2
    assert "is a LoRA for sdxl" in result.output and not (out / "cells").exists()


def test_swap_matrix_applies_prompt_tags_on_every_combination(files, tmp_path):
    import shutil

    from workbench.swap.matrix import swap_matrix

    folder = tmp_path / "models"
    folder.mkdir()
    a = shutil.copy(files["base"], folder / "a.safetensors")
    b = shutil.copy(files["base"], folder / "b.safetensors")  # the same weights: 4 equal cells
    shutil.copy(files["lora"], folder / "style.safetensors")

    def run(prompt, out):
        return swap_matrix([a, b], [prompt], [7], out, steps=2, width=32, height=32, cfg=5.0,
                           device="cpu", dtype=torch.float32)  # fmt: skip

    tagged = run("a red circle <lora:style:1:0.8>", tmp_path / "tagged")
    plain = run("a red circle", tmp_path / "plain")
    images = {c.index: np.asarray(Image.open(tmp_path / "tagged" / c.file)) for c in tagged.cells}
    assert all(np.array_equal(images[i], images[0]) for i in images)  # applied alike, never stacked
    assert not np.array_equal(images[0], np.asarray(Image.open(tmp_path / "plain" / plain.cells[0].file)))
    params = parse_parameters(tagged.cells[3].parameters)
    assert params["prompt"] == "a red circle <lora:style:1:0.8>"
    assert params["Lora hashes"].startswith("style: ")


def test_a_unet_only_switch_leaves_the_text_encoder_alone(files):
    from workbench.pipeline import build_pipeline

    pipe = build_pipeline(files["base"])
    state = LoraState(pipe, files["base"])
    lora = str(files["lora"])
    assert state.apply(((lora, 1.0, 0.5),)) is True  # the text encoder changed: re-encode prompts
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert state.apply(((lora, 1.0, 1.0),)) is False  # only the UNet's strength moved
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te.items())
    assert not all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())
    assert state.apply(((lora, 0.0, 1.0),)) is True and not state.text_encoder_changed
