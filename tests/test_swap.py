import json

import pytest
import torch
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.swap.assemble import swap_components
from workbench.toy.model import toy_init

runner = CliRunner()


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swap")
    return toy_init(folder / "x.safetensors", seed=1), toy_init(folder / "y.safetensors", seed=2)


def raw_bytes(tensor):
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_cli_swap_takes_unet_from_x_and_te_from_y_byte_for_byte(toys, tmp_path):
    x, y = toys
    out = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["swap", "--unet", str(x), "--te", str(y), "-o", str(out)])
    assert result.exit_code == 0, result.output
    s, cx, cy = open_checkpoint(out), open_checkpoint(x), open_checkpoint(y)
    assert set(s) == set(cx)
    for key in s:
        src = cx if key.startswith("model.diffusion_model.") else cy
        assert s.infos[key] == src.infos[key] and raw_bytes(s[key]) == raw_bytes(src[key]), key
    assert sum(k.startswith("cond_stage_model.") for k in s) > 0
    record = json.loads(s.metadata["wb.swap"])
    assert record["unet"]["path"] == str(x) and record["text_encoder"]["path"] == str(y)
    assert (
        len(record["unet"]["sha256"]) == 64 and record["unet"]["sha256"] != record["text_encoder"]["sha256"]
    )
    shown = runner.invoke(app, ["inspect", str(out), "--no-hash"], env={"COLUMNS": "200"})
    assert "assembled by wb swap" in shown.stdout and record["unet"]["sha256"][:10] in shown.stdout


def test_vae_and_base_sources(toys, tmp_path):
    x, y = toys
    out = swap_components(tmp_path / "v.safetensors", unet=x, text_encoder=y, vae=x).path
    s, cx = open_checkpoint(out), open_checkpoint(x)
    vae_key = next(k for k in s if k.startswith("first_stage_model."))
    assert torch.equal(s[vae_key], cx[vae_key])


def test_refuses_to_overwrite_an_input_and_mismatched_widths(toys, tmp_path):
    x, y = toys
    with pytest.raises(WorkbenchError, match="refusing to overwrite an input"):
        swap_components(y, unet=x, text_encoder=y)
    wide_te = save_tensors(
        tmp_path / "wide.safetensors",
        {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(768)},
    )
    with pytest.raises(WorkbenchError, match="expects text features of width 32.*gives 768"):
        swap_components(tmp_path / "bad.safetensors", unet=x, text_encoder=wide_te, base=x)
    assert not (tmp_path / "bad.safetensors").exists()


def test_mismatched_layouts_refused(toys, tmp_path):
    x, _ = toys
    sd2 = save_tensors(
        tmp_path / "sd2.safetensors",
        {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32),
         "cond_stage_model.model.ln_final.weight": torch.ones(32)},
    )  # fmt: skip
    result = runner.invoke(
        app, ["swap", "--unet", str(x), "--te", str(sd2), "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 2 and "mismatched architectures" in result.output


def sdxl_like(path, fill):
    z = torch.full
    return save_tensors(path, {
        "model.diffusion_model.label_emb.0.0.weight": z((4, 8), fill),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": z((4, 2048), fill),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z((768,), fill),
        "conditioner.embedders.1.model.ln_final.weight": z((1280,), fill),
        "first_stage_model.decoder.conv_in.weight": z((2, 4, 3, 3), fill),
    })  # fmt: skip


def test_sdxl_te_l_and_te_g_picked_apart(tmp_path):
    a, b, c = (sdxl_like(tmp_path / f"{n}.safetensors", v) for n, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    out = swap_components(tmp_path / "o.safetensors", unet=a, te_l=b, te_g=c).path
    s = open_checkpoint(out)
    assert s["model.diffusion_model.label_emb.0.0.weight"][0, 0] == 1.0
    assert s["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"][0] == 2.0
    assert s["conditioner.embedders.1.model.ln_final.weight"][0] == 3.0
    both = open_checkpoint(swap_components(tmp_path / "p.safetensors", unet=a, text_encoder=c).path)
    assert both["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"][0] == 3.0
    assert both["conditioner.embedders.1.model.ln_final.weight"][0] == 3.0
