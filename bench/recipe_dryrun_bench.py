"""`wb merge run RECIPE --dry-run` on chains of 15, 150 and 1,500 steps, side by side in one run.

    python bench/recipe_dryrun_bench.py [--repeat 3]

Writes two toy checkpoints (wb's toy base, 513 keys, with seeded noise added) and the recipes in a
temporary folder: step i is weighted(previous, B) (odd i) or add-diff(previous, B, C) (even i).
Each dry-run runs in a fresh process (`python -m workbench.cli`) that reports, per phase:

- imports: `import workbench.cli` (no torch: a dry run never imports it): the same for every recipe;
- command: everything after the imports: read + check the recipe, plan, print;
- read: the YAML read and the recipe checked (documents.py, recipe_schema.py, recipe.py);
- plan: `plan_merge` alone (headers opened, every key planned; the inputs' sha256 come from
  wb's hash cache, warmed by a first run);
- print: the plan printed;
- VmHWM: the process's peak resident memory, and its rise over the imports alone.

The best of --repeat runs is shown (a shared machine is noisy). A malformed 1,500-step recipe (a
bad field at step 1,400) is timed the same way. The last column divides each phase by its time at
15 steps: what grows with the step count should grow linearly (10x, 100x), not quadratically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT

CHILD = r"""
import functools, json, sys, time
t0 = time.perf_counter()
import workbench.cli as cli
from workbench.merge import cli as merge_cli, plan, recipe
t1 = time.perf_counter()
hwm_imports = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
phases = {}
def timed(module, name, label):
    fn = getattr(module, name)
    @functools.wraps(fn)
    def wrapper(*a, **k):
        s = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - s
    setattr(module, name, wrapper)
timed(recipe, "load_yaml", "read")
timed(plan, "plan_merge", "plan")
timed(merge_cli, "_print_plan", "print")
sys.argv = ["wb", "merge", "run", *sys.argv[1:]]
code = 0
try:
    cli.main()
except SystemExit as e:
    code = e.code or 0
t2 = time.perf_counter()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"imports": t1 - t0, "command": t2 - t1, **phases, "code": code,
                  "torch": "torch" in sys.modules,
                  "hwm_mb": hwm / 1024, "hwm_imports_mb": hwm_imports / 1024}), file=sys.stderr)
"""

SIZES = (15, 150, 1500)


def make_inputs(folder: Path) -> tuple[Path, Path, Path]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = ROOT / "workbench" / "toy" / "base.safetensors"
    with safe_open(str(base), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(base)
    out = []
    for seed, name in enumerate(("b", "c")):
        g = torch.Generator().manual_seed(seed)
        noisy = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
            for k, v in tensors.items()
        }
        save_file(noisy, folder / f"{name}.safetensors", metadata=metadata)
        out.append(folder / f"{name}.safetensors")
    return base, out[0], out[1]


def write_chain(path: Path, inputs, n: int, bad_at: int | None = None) -> Path:
    a, b, c = inputs
    lines = ["inputs:", f"  A: '{a}'", f"  B: '{b}'", f"  C: '{c}'", "steps:"]
    for i in range(1, n + 1):
        prev = "A" if i == 1 else f"s{i - 1}"
        if i == bad_at:
            lines.append(f"  s{i}: {{method: add-diff, inputs: [{prev}, B, C], alpha: half}}")
        elif i % 2:
            lines.append(f"  s{i}: {{method: weighted, inputs: [{prev}, B], alpha: 0.01}}")
        else:
            lines.append(f"  s{i}: {{method: add-diff, inputs: [{prev}, B, C], alpha: 0.5}}")
    lines.append(f"output: s{n}")
    path.write_text("\n".join(lines) + "\n")
    return path


def dry_run(recipe: Path, out: Path, env: dict) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(recipe), "-o", str(out), "--dry-run"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - started
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return {**report, "wall": wall, "lines": len(proc.stdout.splitlines()), "error": errors}


def best(runs: list[dict]) -> dict:
    return {k: min(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k] for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wb-recipe-bench-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WB_CACHE_DIR": str(folder / "cache"),
    }
    inputs = make_inputs(folder)
    recipes = {n: write_chain(folder / f"r{n}.yaml", inputs, n) for n in SIZES}
    bad = write_chain(folder / "bad1500.yaml", inputs, 1500, bad_at=1400)
    out = folder / "o.safetensors"
    dry_run(recipes[SIZES[0]], out, env)  # warms the hash cache and the page cache

    results = {n: best([dry_run(recipes[n], out, env) for _ in range(args.repeat)]) for n in SIZES}
    refused = best([dry_run(bad, out, env) for _ in range(args.repeat)])
    print(f"wb merge run CHAIN.yaml -o OUT --dry-run on toy inputs (513 keys), best of {args.repeat}")
    cols = ("wall", "imports", "command", "read", "plan", "print")
    print(f"{'steps':>7} " + " ".join(f"{c + ' s':>9}" for c in cols) + f" {'VmHWM MB':>9} {'+MB':>6}")
    for label, r in [*results.items(), ("1500 !", refused)]:
        vals = " ".join(f"{r.get(c, 0.0):9.3f}" for c in cols)
        rise = r["hwm_mb"] - r["hwm_imports_mb"]
        note = f"exit {r['code']}, {r['lines']} lines" + (", torch imported" if r.get("torch") else "")
        print(f"{label:>7} {vals} {r['hwm_mb']:9.0f} {rise:6.1f}   {note}")
    print(f"        (step 1,400 malformed) {r['error'][0] if r['error'] else 'NOT REFUSED'}")
    small = results[SIZES[0]]
    print("ratio to 15 steps (linear: 10x at 150, 100x at 1500; fixed costs make it smaller):")
    for n in SIZES[1:]:
        r = results[n]
        ratios = "  ".join(f"{c} {r[c] / small[c]:5.1f}x" for c in ("command", "read", "plan", "print"))
        print(f"{n:>7} steps ({n // SIZES[0]}x): {ratios}")
    per_step = {n: (results[n]["command"] - small["command"]) / (n - SIZES[0]) * 1000 for n in SIZES[1:]}
    print("command ms per added step: " + ", ".join(f"{v:.3f} ({n} steps)" for n, v in per_step.items()))


if __name__ == "__main__":
    main()
