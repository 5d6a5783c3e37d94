"""`wb demo --quick` end to end: the whole story on the shipped toy base, offline, on a CPU."""

import json

import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.toy.pretrain import toy_base_path


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    assert toy_base_path().is_file()
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    index = (out / "index.html").read_text()
    for link in ("grid/grid.png", "matrix/grid.png", "lr_find/lr_find.png", "runs/v4/loss.png"):
        assert link in index and (out / link).is_file(), link
    for name in ("base", "v4", "dadapt", "v4_dadapt", "v4_plus_dadapt_delta", "kitchen_sink"):
        assert (out / "models" / f"{name}.safetensors").is_file(), name
    cells = json.loads((out / "grid" / "grid.json").read_text())["cells"]
    assert len(cells) == 6 * 2 and all((out / "grid" / c["file"]).is_file() for c in cells)
    # The story holds: v4 was fine-tuned with a deliberately high UNet lr, and the matrix says so.
    verdicts = json.loads((out / "matrix" / "matrix.json").read_text())["verdicts"]
    assert "The UNet of v4 carries" in verdicts[0]
    assert "swap matrix:" in result.output and "index.html" in result.output


def test_ctrl_c_in_a_demo_fine_tune_stops_the_demo(tmp_path, monkeypatch):
    from workbench import demo
    from workbench.train import loop

    def interrupted(recipe, run_dir, **kw):
        return loop.TrainResult(run_dir, 3, 10, 1, [], [], 0.1, "interrupted", "interrupted at step 3",
                                seconds=1.0, train_seconds=1.0)  # fmt: skip

    monkeypatch.setattr(loop, "train", interrupted)
    recipe = {"model": {"base": "toy:init"}, "data": {"root": "toy:shapes"}, "training": {"max_steps": 10}}
    with pytest.raises(KeyboardInterrupt):
        demo._train(recipe, tmp_path / "run")
