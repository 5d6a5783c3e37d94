import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from workbench.checkpoint.safetensors_io import save_tensors
from workbench.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "a.safetensors"
    result = runner.invoke(app, ["toy", "init", str(path), "--seed", "1"])
    assert result.exit_code == 0, result.output
    return path


def test_help_lists_the_verbs():
    # The console script itself, as a user runs it.
    wb = Path(sys.executable).with_name("wb")
    done = subprocess.run(
        [str(wb), "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"}
    )
    assert done.returncode == 0
    for verb in ("inspect", "toy"):
        assert verb in done.stdout


def test_inspect_json_on_toy(toy_file):
    result = runner.invoke(app, ["inspect", str(toy_file), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["format"] == "safetensors" and d["architecture"] == "toy" and d["layout"] == "sd1"
    for name in ("unet", "text_encoder", "vae"):
        assert d["components"][name]["params"] > 0 and d["components"][name]["keys"] > 0
    # The toy text encoder has the real 49,408-token vocabulary at width 32.
    assert d["components"]["text_encoder"]["params"] > 49408 * 32
    assert len(d["sha256"]) == 64 and d["autov2"] == d["sha256"][:10]
    assert d["metadata"]["wb.architecture"] == "toy"


def test_inspect_table(toy_file):
    result = runner.invoke(app, ["inspect", str(toy_file)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "toy" in result.stdout and "unet" in result.stdout and "AutoV2" in result.stdout


def one_error_line(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, toy_file):
    line = one_error_line(runner.invoke(app, ["inspect", str(tmp_path / "missing.safetensors")]))
    assert "missing.safetensors: no such file" in line

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(toy_file.read_bytes()[:100_000])
    assert "cut.safetensors: truncated" in one_error_line(runner.invoke(app, ["inspect", str(cut)]))

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "p": Payload(marker)}, evil)
    line = one_error_line(runner.invoke(app, ["inspect", str(evil)]))
    assert "evil.ckpt: refused" in line and not marker.exists()

    # A LoRA file is described as one (tests/test_lora_cli.py); a broken one is named by its module.
    lora = save_tensors(tmp_path / "lora.safetensors", {"lora_te_x.alpha": torch.tensor(1.0)})
    assert "module lora_te_x has no down/up tensor" in one_error_line(
        runner.invoke(app, ["inspect", str(lora)])
    )


def test_global_threads_option(tmp_path):
    import torch

    from workbench.toy.model import toy_init

    path = toy_init(tmp_path / "toy.safetensors", seed=0)
    before = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["--threads", "1", "inspect", "--no-hash", str(path)])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = runner.invoke(app, ["--threads", "0", "inspect", str(path)])
    assert result.exit_code == 2 and result.output.strip() == "error: --threads 0: must be at least 1"
