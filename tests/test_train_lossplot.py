import json

import pytest
from PIL import Image

from workbench.train.runs import loss_figure, write_loss_plot


def write_metrics(run, lines):
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_loss_plot_from_metrics(tmp_path):
    lines = [{"step": 0, "loss/val": 1.0, "loss/train_stable": 1.1}]
    lines += [{"step": s, "loss/train": 1.0 / s} for s in range(1, 30)]
    lines += [{"step": 29, "loss/val": 0.4}]
    write_metrics(tmp_path, lines)
    out = write_loss_plot(tmp_path)
    assert out == tmp_path / "loss.png" and sorted(p.name for p in tmp_path.iterdir()) == [
        "loss.png",
        "metrics.jsonl",
    ]
    assert Image.open(out).size == (900, 540)

    ax = loss_figure(tmp_path).axes[0]
    assert (
        ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title() == f"{tmp_path.name}: loss"
    )
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["loss/train", "loss/train (EMA 0.9)", "loss/val", "loss/train_stable"]
    train, ema, val, stable = ax.lines
    assert list(train.get_xdata()) == list(range(1, 30)) and train.get_ydata()[1] == 0.5
    # the EMA starts at the first loss: 1, 0.9*1 + 0.1/2 = 0.95, 0.9*0.95 + 0.1/3 = 0.888333...
    assert list(ema.get_ydata()[:3]) == pytest.approx([1.0, 0.95, 0.855 + 0.1 / 3])
    assert (
        list(val.get_xdata()) == [0, 29] and list(val.get_ydata()) == [1.0, 0.4] and val.get_marker() == "o"
    )
    assert list(stable.get_xdata()) == [0] and list(stable.get_ydata()) == [1.1]
    assert val.get_linestyle() == "-" and stable.get_linestyle() == "--"  # told apart where they overlap


def test_no_losses_no_plot(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "lr/unet": 1e-4}])
    assert write_loss_plot(tmp_path) is None and not (tmp_path / "loss.png").exists()
