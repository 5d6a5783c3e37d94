"""The LoRA acceptance flow as a new user runs it, on the toy models (docs/lora.md shows its output).

    python bench/lora_acceptance.py [--dir out/lora_accept] [--steps 160] [--rank 16]

1. fine-tune "v4" from the shipped toy base (the demo's V4 settings: AdamW, UNet lr 3e-3, TE 1e-5);
2. wb lora extract v4.safetensors base.safetensors --rank 16 -o v4_lora.safetensors
3. wb inspect v4_lora.safetensors
4. wb lora bake base.safetensors v4_lora.safetensors:1.0 -o back.safetensors
5. for comparison, the same with parts left out (each baked the same way):
   --lora-only --conv-rank 0 (a pure kohya LoRA of kohya's default modules) -> back_kohya,
   --lora-only (the ResNet convs too, no extras: a plain LoCon) -> back_locon,
   --conv-rank 0 (extras, no ResNet convs) -> back_noconv;
6. wb grid --ckpts base,v4,back,... (2 prompts x 2 seeds), then the mean absolute pixel
   difference of every "back" cell from the same cell of v4 and of base: back should look like v4.
Each wb command runs as a subprocess (`python -m workbench.cli ...`); their output is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]
VARIANTS = {  # name -> extra flags of `wb lora extract` (what each leaves out)
    "kohya": ["--lora-only", "--conv-rank", 0],
    "locon": ["--lora-only"],
    "noconv": ["--conv-rank", 0],
}


def wb(*args: object) -> str:
    cmd = [sys.executable, "-m", "workbench.cli", *map(str, args)]
    print("$ wb " + " ".join(map(str, args)), flush=True)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "110"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(res.stdout.rstrip())
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    print(f"[{time.perf_counter() - t:.1f} s]\n", flush=True)
    return res.stdout


def train_v4(base: Path, folder: Path, steps: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from workbench.demo import OPTIMIZERS, _finetune_recipe, _resolution, _train

    run = folder / "v4_run"
    if run.exists():
        shutil.rmtree(run)
    result = _train(_finetune_recipe(base, "v4", steps, _resolution(base), OPTIMIZERS["v4"]), run)
    out = folder / "v4.safetensors"
    shutil.copyfile(result.checkpoints[-1], out)
    return out


def mean_pixel_diffs(grid_dir: Path) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    doc = json.loads((grid_dir / "grid.json").read_text())
    cells: dict[tuple, dict[str, np.ndarray]] = {}
    for c in doc["cells"]:
        img = np.asarray(Image.open(grid_dir / c["file"]).convert("RGB"), dtype=np.float64)
        cells.setdefault((c["prompt"], c["seed"]), {})[c["checkpoint"]] = img
    backs = ["back", *(f"back_{n}" for n in VARIANTS)]
    pairs = [(b, other) for b in backs for other in ("v4", "base")] + [("v4", "base")]
    out: dict[str, list[float]] = {f"{a} vs {b}": [] for a, b in pairs}
    for imgs in cells.values():
        for a, b in pairs:
            out[f"{a} vs {b}"].append(float(np.abs(imgs[a] - imgs[b]).mean()))
    return {k: sum(v) / len(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "out" / "lora_accept")
    ap.add_argument("--steps", type=int, default=160, help="fine-tune steps for v4 (the demo's)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    folder = args.dir
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WB_CACHE_DIR", str(folder / "wb-cache"))
    base = folder / "base.safetensors"
    shutil.copyfile(ROOT / "workbench" / "toy" / "base.safetensors", base)
    v4 = folder / "v4.safetensors"
    if not v4.exists():
        t = time.perf_counter()
        v4 = train_v4(base, folder, args.steps)
        print(f"fine-tuned v4 in {time.perf_counter() - t:.0f} s ({args.steps} steps)\n")
    lora, back = folder / "v4_lora.safetensors", folder / "back.safetensors"
    wb("lora", "extract", v4, base, "--rank", args.rank, "-o", lora)
    wb("inspect", lora)
    wb("lora", "bake", base, f"{lora}:1.0", "-o", back)
    backs = [back]
    for name, flags in VARIANTS.items():
        part, out = folder / f"v4_{name}.safetensors", folder / f"back_{name}.safetensors"
        wb("lora", "extract", v4, base, "--rank", args.rank, *flags, "-o", part)
        wb("lora", "bake", base, f"{part}:1.0", "-o", out)
        backs.append(out)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    grid = folder / "grid"
    ckpts = ",".join(str(p) for p in [base, v4, *backs])
    wb("grid", "--ckpts", ckpts, "--prompts", folder / "prompts.txt",
       "--seeds", "1,2", "--steps", 12, "--size", "64x64", "-o", grid)  # fmt: skip
    diffs = mean_pixel_diffs(grid)
    print("mean |pixel difference| (0-255), averaged over prompts x seeds:")
    for k, v in diffs.items():
        print(f"  {k:20} {v:6.2f}")


if __name__ == "__main__":
    main()
