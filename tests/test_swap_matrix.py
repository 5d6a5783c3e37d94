import json

import pytest
import torch
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.swap.matrix import Effect, swap_matrix, verdict
from workbench.toy.model import toy_init


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return toy_init(tmp_path_factory.mktemp("matrix") / "base.safetensors", seed=3)


def damaged(base, out, prefix, scale):
    """A copy of `base` with every float tensor under `prefix` scaled: a deliberately burnt part."""
    ckpt = open_checkpoint(base)
    tensors = {
        k: (v * scale if k.startswith(prefix) and v.is_floating_point() else v.clone())
        for k, v in ckpt.items()
    }
    return save_tensors(out, tensors, ckpt.metadata)


def run(ckpts, out, **kw):
    with torch.random.fork_rng():
        prompts = ["a red circle on a blue background"]
        return swap_matrix(ckpts, prompts, [7], out, steps=2, width=64, height=64, cfg=5.0, device="cpu",
                           dtype=torch.float32, **kw)  # fmt: skip


def test_verdict_names_the_damaged_unet(base, tmp_path):
    burnt = damaged(base, tmp_path / "v4.safetensors", "model.diffusion_model.out.", 8.0)
    result = run([base, burnt], tmp_path / "m")
    unet, te = result.effects
    assert (unet.component, te.component) == ("UNet", "TE")
    assert te.drift == 0.0 and unet.drift > 0.01  # an unchanged TE renders the base pixels exactly
    assert "The UNet of v4 carries most of the change." in result.verdicts[0]
    data = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert len(data["cells"]) == 4 and data["verdicts"] == result.verdicts
    assert (tmp_path / "m" / "grid.png").exists() and "carries most" in (
        tmp_path / "m" / "index.html"
    ).read_text()


def test_verdict_names_the_damaged_text_encoder(base, tmp_path):
    burnt = damaged(
        base,
        tmp_path / "te_burnt.safetensors",
        "cond_stage_model.transformer.text_model.final_layer_norm.",
        25.0,
    )
    result = run([base, burnt], tmp_path / "m")
    unet, te = result.effects
    assert unet.drift == 0.0 and te.drift > 0.01
    assert "The text encoder of te_burnt carries most of the change." in result.verdicts[0]


def test_verdict_sentence_rules():
    quiet = verdict("x", Effect("x", "UNet", 0.2, 0.001), Effect("x", "TE", 0.0, 0.0))
    assert quiet.endswith("Neither component of x changes the pictures visibly.")
    close = verdict("x", Effect("x", "UNet", 0.0, 0.05), Effect("x", "TE", 0.0, 0.04))
    assert close.endswith("The UNet of x carries more of the change.")


def test_bad_input(base, tmp_path):
    with pytest.raises(WorkbenchError, match="at least two checkpoints"):
        swap_matrix([base], ["p"], [1], tmp_path / "o")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = CliRunner().invoke(app, ["swap", "matrix", "--ckpts", f"{base},{tmp_path / 'nope.safetensors'}",
                                      "--prompts", str(prompts), "-o", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "nope.safetensors: no such file" in result.output
