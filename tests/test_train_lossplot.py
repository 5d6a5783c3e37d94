import json

import numpy as np
from PIL import Image

from workbench.train.runs import write_loss_plot


def test_loss_plot_from_metrics(tmp_path):
    lines = [{"step": 0, "loss/val": 1.0, "loss/train_stable": 1.1}]
    lines += [{"step": s, "loss/train": 1.0 / s} for s in range(1, 30)]
    lines += [{"step": 29, "loss/val": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = write_loss_plot(tmp_path)
    assert out == tmp_path / "loss.png"
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.std() > 10  # something was drawn


def test_no_losses_no_plot(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr/unet": 1e-4}) + "\n")
    assert write_loss_plot(tmp_path) is None and not (tmp_path / "loss.png").exists()
