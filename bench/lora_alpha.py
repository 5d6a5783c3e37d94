"""Seed 002's alpha/dim claim, measured on the toy: LoRA runs that differ only in network.alpha.

    python bench/lora_alpha.py [--steps 120] [--dim 16] [--alphas 16,4,1] [--out docs/img/lora_alpha.png]

Every run trains a rank-`dim` LoRA on a fresh toy model (`wb toy init`, seed 0: a base with
everything still to learn, so the speed of learning shows in the validation loss; on the shipped,
pretrained toy base a LoRA on toy:shapes has nothing left to learn) at 32 px, UNet + text
encoder with kohya's default modules, same data, seed and steps, once with AdamW at a fixed lr
and once with D-Adaptation Adam (lr 1.0, decouple, weight decay 0.02: seed 002's settings).
It prints, per run: the validation loss at the start and the end, the size of the change the
LoRA makes (mean over modules of ||(alpha/r) up @ down||, the Frobenius norm
of dW), its stored weights' size (max |up|), and for D-Adaptation the final d*lr of the UNet.
It draws validation loss against step (left) and D-Adaptation's logged lr/d*lr/unet (right).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ADAMW_LR = 3e-3


def recipe(base: str, optimizer: str, dim: int, alpha: float, steps: int) -> dict:
    dadapt = optimizer == "dadapt_adam"
    return {
        "model": {"base": base},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 64, "seed": 7}},
        "validation": {"split": 0.15, "every_n_steps": max(1, steps // 6), "every_n_epochs": None,
                       "stabilize_train": False},  # fmt: skip
        "network": {"type": "lora", "dim": dim, "alpha": alpha},
        "optimizer": {"name": optimizer, "lr": 1.0 if dadapt else ADAMW_LR, "weight_decay": 0.02,
                      **({"decouple": True} if dadapt else {}),
                      "text_encoder": {"lr": 0.5 if dadapt else ADAMW_LR / 2}},  # fmt: skip
        "schedule": {"name": "constant"},
        "training": {"max_steps": steps, "batch_size": 2, "seed": 555, "device": "cpu"},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }


def delta_sizes(path: Path) -> tuple[float, float]:
    """(mean ||dW||_F over modules, max |up|) of a kohya LoRA file."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(path))
    norms, up_max = [], 0.0
    for key in t:
        if key.endswith(".alpha"):
            name = key[: -len(".alpha")]
            up, down = t[name + ".lora_up.weight"].flatten(1), t[name + ".lora_down.weight"].flatten(1)
            norms.append(float(torch.linalg.norm((t[key] / down.shape[0]) * (up @ down))))
            up_max = max(up_max, float(up.abs().max()))
    return sum(norms) / len(norms), up_max


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--alphas", default="16,4,1")
    ap.add_argument("--optimizers", default="adamw,dadapt_adam")
    ap.add_argument("--out", default="docs/img/lora_alpha.png")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from workbench.plot import Series, line_chart
    from workbench.toy.model import toy_init
    from workbench.train.loop import train
    from workbench.train.recipe import parse_recipe
    from workbench.train.runs import read_metrics

    torch.set_num_threads(1)
    alphas = [float(a) for a in args.alphas.split(",")]
    rows, loss_series, d_series = [], [], []
    with tempfile.TemporaryDirectory(prefix="wb-lora-alpha-") as tmp:
        base = str(toy_init(Path(tmp) / "base.safetensors", seed=0))
        for optimizer in args.optimizers.split(","):
            for alpha in alphas:
                t0 = time.time()
                out = Path(tmp) / f"{optimizer}-{alpha:g}"
                r = parse_recipe(recipe(base, optimizer, args.dim, alpha, args.steps), "bench")
                result = train(r, out)
                metrics = read_metrics(out)
                val = [(m["step"], m["loss/val"]) for m in metrics if "loss/val" in m]
                dlr = [(m["step"], m["lr/d*lr/unet"]) for m in metrics if m.get("lr/d*lr/unet") is not None]
                norm, up_max = delta_sizes(result.checkpoints[-1])
                label = f"{optimizer} a/r={alpha / args.dim:g}"
                rows.append({"optimizer": optimizer, "alpha": alpha, "dim": args.dim,
                             "scale": alpha / args.dim, "val_start": val[0][1], "val_end": val[-1][1],
                             "dW_norm": norm, "max_up": up_max, "d*lr_unet_end": dlr[-1][1] if dlr else None,
                             "seconds": round(time.time() - t0, 1)})  # fmt: skip
                loss_series.append(Series([s for s, _ in val], [v for _, v in val], label, points=True))
                if dlr:
                    name = f"a/r={alpha / args.dim:g}"
                    d_series.append(Series([s for s, _ in dlr], [v for _, v in dlr], name))
                print(json.dumps(rows[-1]), flush=True)
    left = line_chart(loss_series, title=f"LoRA dim {args.dim} on the toy: validation loss",
                      x_label="step", y_label="loss/val", width=640, height=420)  # fmt: skip
    right = line_chart(d_series, title="D-Adaptation: lr/d*lr/unet", x_label="step", y_label="d*lr",
                       width=640, height=420)  # fmt: skip
    figure = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    figure.paste(left, (0, 0))
    figure.paste(right, (left.width, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print("| optimizer | alpha/dim | val loss start -> end | mean ||dW|| | max |up| | final d*lr (UNet) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = f"{r['d*lr_unet_end']:.3g}" if r["d*lr_unet_end"] is not None else "-"
        print(f"| {r['optimizer']} | {r['scale']:g} | {r['val_start']:.4f} -> {r['val_end']:.4f} | "
              f"{r['dW_norm']:.3g} | {r['max_up']:.3g} | {d} |")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
