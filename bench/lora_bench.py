"""Benchmark `wb lora bake` and `wb lora extract` on SD1.5-size checkpoints, side by side.

    python bench/lora_bench.py [--dir DIR] [--reps 2] [--rank 64] [--parts bake,extract] [--cache warm,cold]

Inputs: two random SD1.5-size fp16 checkpoints from bench/make_sd15.py (real keys and shapes) and a
random rank-64 kohya LoRA for them (UNet transformer modules + text encoder, kohya's default set,
alpha 32), written once in DIR.

Bake, in one run, each tool in its own subprocess (peak memory is its own), output fp16, fsynced:
- floor: read the base and the LoRA and write a file of the output's size with plain file I/O;
- naive: load both files whole (safetensors load_file), W + m * (alpha/r) * up @ down in float32 per
  module, save_file;
- wb: `workbench.lora.ops.bake` (the merge engine; 2 threads compute, 1 writes).
The outputs of naive and wb are compared key by key.

Extract at rank 64 (UNet + TE, no conv), from two differences: "random" (tuned = another random
checkpoint: a flat spectrum, the hard case for a randomized SVD) and "lora" (tuned = the base with the
LoRA baked in at 1.0, fp16: rank 64 plus rounding noise). Each with --svd exact and --svd auto
(torch.svd_lowrank where a module is large enough); per module the truncation error
|D|*sqrt(1 - kept^2) of auto is compared with exact's.

Memory: peak RssAnon (private memory, not the page cache of mapped inputs), sampled every 5 ms.
Times exclude interpreter start and imports. The machine is shared: run it twice and compare
ratios measured in the same run rather than absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import drop_from_cache, ensure_sd15, fsync_path, read_into_cache, wait_peak_rss_anon_kb

ROOT = Path(__file__).resolve().parent.parent
STRENGTH = 0.8


# ---------------------------------------------------------------------------------------------------
# children


def child_floor(base: Path, lora: Path, out: Path) -> None:
    buf = bytearray(16 << 20)
    with open(lora, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    with open(base, "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst:
        while n := src.readinto(buf):
            dst.write(memoryview(buf)[:n])
        os.fsync(dst.fileno())


def child_naive(base: Path, lora: Path, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from workbench.checkpoint.safetensors_io import info_of
    from workbench.lora.names import lora_targets

    sd = load_file(base)
    lo = load_file(lora)
    targets = lora_targets({k: info_of(v) for k, v in sd.items()})
    for name, t in targets.items():
        if f"{name}.lora_down.weight" not in lo:
            continue
        up, down = lo[f"{name}.lora_up.weight"].float(), lo[f"{name}.lora_down.weight"].float()
        scale = float(lo[f"{name}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).mul_(scale)
        w = sd[t.key].float()
        w.add_(delta.reshape(w.shape), alpha=STRENGTH)
        sd[t.key] = w.to(torch.float16)
    save_file(sd, out, metadata={"format": "pt"})
    fsync_path(out)


def child_wb(base: Path, lora: Path, out: Path) -> None:
    from workbench.lora.ops import LoraSpec, bake

    bake(base, [LoraSpec(str(lora), STRENGTH)], out, dtype="fp16")  # default threads: 2 compute, 1 writes


def child_extract(
    tuned: Path, base: Path, out: Path, method: str, rank: int, report: Path, components: str, conv_rank: int
) -> None:
    from workbench.lora.extract import extract

    res = extract(tuned, base, out, rank, conv_rank=int(conv_rank) or None, components=components.split(","),
                  method=method, dtype="F16")  # fmt: skip
    report.write_text(json.dumps({m.name: [m.norm, m.kept] for m in res.modules}))


IMPORTS = {
    "floor": [],
    "naive": ["torch", "safetensors.torch", "workbench.lora.names"],
    "wb": ["torch", "workbench.lora.ops", "workbench.merge.engine", "workbench.merge.provenance"],
    "extract": ["torch", "workbench.lora.extract"],
}


def run_child(args: list[str]) -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    tool, *rest = args
    for module in IMPORTS[tool]:
        importlib.import_module(module)
    t = time.perf_counter()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    if tool == "extract":
        tuned, base, out, method, rank, report, components, conv_rank = rest
        paths = Path(tuned), Path(base), Path(out)
        child_extract(*paths, method, int(rank), Path(report), components, int(conv_rank))
    else:
        base, lora, out = map(Path, rest)
        {"floor": child_floor, "naive": child_naive, "wb": child_wb}[tool](base, lora, out)
    done = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (done.ru_utime - cpu.ru_utime) + (done.ru_stime - cpu.ru_stime)
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": cpu_s}))


# ---------------------------------------------------------------------------------------------------
# parent


def measure(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = wait_peak_rss_anon_kb(proc)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed: {stderr.strip()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rss_anon_mb"] = peak / 1024
    return result


def ensure_inputs(folder: Path, rank: int) -> tuple[Path, Path, Path]:
    paths = ensure_sd15(folder, 2)
    lora = folder / f"lora_r{rank}.safetensors"
    if not lora.exists():
        from workbench.lora.synthetic import synthetic_lora

        print(f"writing {lora} (random, rank {rank}, alpha {rank // 2}) ...", flush=True)
        synthetic_lora(
            lora, paths[0], rank=rank, alpha=rank / 2, groups=("attn", "te"), std=0.02, dtype="F16"
        )
    return paths[0], paths[1], lora


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    import torch

    from workbench.checkpoint.reader import open_checkpoint

    x, y = open_checkpoint(a), open_checkpoint(b)
    same = total = 0
    worst = 0.0
    for k in x.infos:
        total += 1
        if torch.equal(x[k], y[k]):
            same += 1
        elif x[k].is_floating_point():
            worst = max(worst, float((x[k].float() - y[k].float()).abs().max()))
    return same, total, worst


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):6.2f})"


def prepare_cache(paths: list[Path], cache: str) -> None:
    """warm: read the inputs once (they stay in the page cache); cold: evict them (posix_fadvise)."""
    os.sync()
    time.sleep(1.0)  # let writeback of the previous output finish
    if cache == "warm":
        read_into_cache(paths)
    else:
        drop_from_cache(paths)


def bench_bake(base: Path, lora: Path, folder: Path, reps: int, cache: str = "warm") -> None:
    rows: dict[str, list[dict]] = {"floor": [], "wb": [], "naive": []}
    for r in range(reps):
        for tool in ("floor", "wb"):
            prepare_cache([base, lora], cache)
            rows[tool].append(measure([tool, base, lora, folder / f"bake_{tool}.safetensors"]))
        if r == 0:
            prepare_cache([base, lora], cache)
            rows["naive"].append(measure(["naive", base, lora, folder / "bake_naive.safetensors"]))
    floor = [x["seconds"] for x in rows["floor"]]
    rank = lora.stem.split("_r")[-1]
    print(f"\nbake ({cache} cache): SD1.5-size fp16 base, rank-{rank} LoRA at {STRENGTH}, fp16 output")
    print(f"{'tool':8} {'seconds: median (min)':>24} {'x floor':>8} {'cpu s':>7} {'peak RssAnon MB':>16}")
    for tool, runs in rows.items():
        secs = [x["seconds"] for x in runs]
        ratio = statistics.median(secs) / statistics.median(floor)
        cpu = statistics.median(x["cpu_seconds"] for x in runs)
        print(f"{tool:8} {fmt(secs):>24} {ratio:8.2f} {cpu:7.1f} {max(x['rss_anon_mb'] for x in runs):16.0f}")
    per_round = [w["seconds"] / f["seconds"] for w, f in zip(rows["wb"], rows["floor"], strict=True)]
    print(f"wb / floor per round: {', '.join(f'{x:.2f}' for x in per_round)}")
    same, total, worst = compare(folder / "bake_wb.safetensors", folder / "bake_naive.safetensors")
    print(f"wb vs naive output: {same}/{total} tensors bit-identical, max |diff| {worst:.3g}")


def bench_extract(
    pairs: dict[str, tuple[Path, Path]], folder: Path, rank: int, components: str, methods: list[str],
    conv_rank: int = 0,
) -> None:
    convs = f"ResNet convs at rank {conv_rank}" if conv_rank else "kohya's default modules"
    print(f"\nextract at rank {rank}, components {components} ({convs}), fp16 file")
    print(f"{'difference':10} {'svd':6} {'seconds':>8} {'cpu s':>7} {'peak RssAnon MB':>16} {'fro kept':>9} "
          f"{'err/exact: max':>15} {'median':>7}")  # fmt: skip
    for label, (tuned, base) in pairs.items():
        reports = {}
        for method in methods:
            report = folder / f"extract_{label}_{method}.json"
            res = measure(["extract", tuned, base, folder / f"extract_{label}_{method}.safetensors", method,
                           rank, report, components, conv_rank])  # fmt: skip
            reports[method] = json.loads(report.read_text())
            err = {k: n * max(0.0, 1 - kept**2) ** 0.5 for k, (n, kept) in reports[method].items()}
            energy = sum(n * n for n, _ in reports[method].values())
            kept = (sum((n * k) ** 2 for n, k in reports[method].values()) / energy) ** 0.5
            if method == "exact" or "exact" not in reports:
                exact_err = err
                ratio_max = ratio_med = 1.0 if method == "exact" else float("nan")
            else:
                ratios = [err[k] / exact_err[k] for k in err if exact_err[k] > 0]
                ratio_max, ratio_med = max(ratios), statistics.median(ratios)
            secs, cpu, mem = res["seconds"], res["cpu_seconds"], res["rss_anon_mb"]
            print(f"{label:10} {method:6} {secs:8.1f} {cpu:7.1f} {mem:16.0f} {kept:9.4f} "
                  f"{ratio_max:15.4f} {ratio_med:7.4f}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "out" / "lora_bench")
    ap.add_argument("--reps", type=int, default=2, help="runs of floor and wb (naive runs once)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--parts", default="bake,extract")
    ap.add_argument("--components", default="unet,te", help="what extract takes: unet,te (all) or te")
    ap.add_argument("--svd", default="exact,auto", help="extract's SVD methods (exact: reference)")
    ap.add_argument("--conv-rank", type=int, default=0, help="extract ResNet convs at this rank too")
    ap.add_argument(
        "--cache", default="warm", help="bake with inputs warm or cold in the page cache, or warm,cold"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child)
        return
    os.environ.setdefault("WB_CACHE_DIR", str(args.dir / "wb-cache"))
    sys.path.insert(0, str(ROOT))
    base, other, lora = ensure_inputs(args.dir, args.rank)
    from workbench.checkpoint.hashing import sha256_file

    for p in (base, other, lora):
        sha256_file(p)  # once, cached: wb records input hashes in the output's metadata
    parts = args.parts.split(",")
    if "bake" in parts:
        for cache in args.cache.split(","):
            bench_bake(base, lora, args.dir, args.reps, cache)
    if "extract" in parts:
        baked = args.dir / "bake_wb.safetensors"
        if not baked.exists():
            measure(["wb", base, lora, baked])
        pairs = {"random": (other, base), "lora": (baked, base)}
        bench_extract(pairs, args.dir, args.rank, args.components, args.svd.split(","), args.conv_rank)


if __name__ == "__main__":
    main()
