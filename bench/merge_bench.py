"""Benchmark `wb merge` on three SD1.5-size fp16 checkpoints against the floor and its peers.

    python bench/merge_bench.py [--dir DIR] [--reps 3] [--cache cold,warm] [--methods add-diff,bake]
                                [--mecha-python /work/bench-venv/bin/python]

In one run, for a weighted sum (alpha 0.5), an add-difference (alpha 1.0) and a LoRA bake (a rank-64
kohya LoRA on every attention, conv and text-encoder module, strength 1.0), each tool runs in its own
subprocess (so peak memory is its own) and its output is checked against the float32 reference:
- floor: read every input and write one output of the same size with plain file I/O, nothing else;
- naive: a whole-dict merge (safetensors load_file of every input, compute, save_file);
- sd-mecha 1.1.x, when importable by --mecha-python (install it in a separate venv, never in wb's);
- wb: `workbench.merge` (the bake: `workbench.lora.ops.bake`), 2 threads, fp16 output.
Every tool's time includes an fsync of its output (wb's writer does one anyway), so all four leave a
durable file, and excludes interpreter start and imports. Inputs come from bench/make_sd15.py (random
values, real SD1.5 keys and shapes); their sha256 are computed once before timing (wb caches them by
path and mtime, as A1111 does).
Page cache (--cache, both by default, one table each): `cold` evicts every input from the page cache
before each run (posix_fadvise DONTNEED, no root needed), so every tool reads from the disk; `warm`
reads every input once before each run, so it sits in the page cache (the usual case right after a
download or a previous merge) and the disk hides nothing. Tools run interleaved, rotating the order
each round, with a sync and a pause before every run; the table gives the fastest (and the median)
of the rounds, and ratios to the floor of the fastest runs and per round (load drifts cancel out).
Memory: peak RssAnon (private memory, not the page cache of mapped inputs), sampled every 5 ms by
the parent, and VmHWM (peak resident set, mapped input pages included) read by the child at exit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNET = "model.diffusion_model."
TE = "cond_stage_model."
ALPHA = {"weighted": 0.5, "add-diff": 1.0, "bake": 1.0}
N_INPUTS = {"weighted": 2, "add-diff": 3, "bake": 1}
LORA_RANK = 64
SLOW_TOOLS = ("naive", "sd-mecha")


# ---------------------------------------------------------------------------------------------------
# children: one tool, one merge, timed inside the process (interpreter start and imports excluded)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child_floor(method: str, inputs: list[Path], out: Path) -> None:
    buf_size = 16 << 20
    bufs = [bytearray(buf_size) for _ in inputs]
    files = [open(p, "rb", buffering=0) for p in inputs]  # noqa: SIM115 - closed below
    with open(out, "wb", buffering=0) as dst:
        while True:
            n = [f.readinto(b) for f, b in zip(files, bufs, strict=True)][0]
            if not n:
                break
            dst.write(memoryview(bufs[0])[:n])
        os.fsync(dst.fileno())
    for f in files:
        f.close()


def _merge_expr(method: str, ts: list, alpha: float):
    a, b = ts[0].float(), ts[1].float()
    if method == "weighted":
        return (1 - alpha) * a + alpha * b
    return a + alpha * (b - ts[2].float())


def _binding(base: Path, lora: Path):
    """The LoRA's modules matched to the base's keys (headers only): the naive bake's map too."""
    from workbench.checkpoint.lora_format import open_lora
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.lora.bake import bind_lora

    with open_checkpoint(base) as ckpt:
        infos = dict(ckpt.infos)
    return bind_lora(open_lora(lora), infos, str(base), "sd1")


def child_naive(method: str, inputs: list[Path], out: Path) -> None:
    from safetensors.torch import load_file, save_file  # already imported by run_child, untimed

    if method == "bake":  # whole dicts: load the base, add every module's delta, save
        base, lora = inputs
        sd = load_file(base)
        binding = _binding(base, lora)
        for key in binding.by_key:
            w = sd[key].float()
            binding.apply(key, w, ALPHA[method])
            sd[key] = w.to(sd[key].dtype)
        save_file(sd, out, metadata={"format": "pt"})
        _fsync(out)
        return
    sds = [load_file(p) for p in inputs]
    merged = {}
    for key, a in sds[0].items():
        if a.is_floating_point() and key.startswith((UNET, TE)):
            merged[key] = _merge_expr(method, [sd[key] for sd in sds], ALPHA[method]).half()
        else:
            merged[key] = a
    save_file(merged, out, metadata={"format": "pt"})
    _fsync(out)


def child_mecha(method: str, inputs: list[Path], out: Path) -> None:
    import sd_mecha  # already imported by run_child, untimed
    import torch
    import tqdm

    models = [sd_mecha.model(str(p)) for p in inputs]
    if method == "weighted":
        recipe = sd_mecha.weighted_sum(models[0], models[1], alpha=ALPHA[method])
    else:
        recipe = sd_mecha.add_difference(models[0], models[1], models[2], alpha=ALPHA[method])
    quiet_bar = functools.partial(tqdm.tqdm, disable=True)
    sd_mecha.merge(
        recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16, threads=2, tqdm=quiet_bar
    )
    _fsync(out)


def child_wb(method: str, inputs: list[Path], out: Path) -> None:
    from workbench.merge import merge, single_step  # already imported by run_child, untimed

    if method == "bake":
        from workbench.lora.ops import LoraSpec, bake

        bake(inputs[0], [LoraSpec(str(inputs[1]), ALPHA[method])], out, dtype="fp16", threads=2)
        return
    merge(single_step(method, inputs, {"alpha": ALPHA[method]}, dtype="fp16"), out, threads=2)


CHILDREN = {"floor": child_floor, "naive": child_naive, "sd-mecha": child_mecha, "wb": child_wb}


# What each tool imports: done before the clock starts (torch alone takes 1.5 s to import here).
IMPORTS = {
    "floor": [],
    "naive": ["torch", "safetensors.torch", "workbench.lora.bake", "workbench.checkpoint.lora_format"],
    "sd-mecha": ["torch", "tqdm", "sd_mecha"],
    "wb": [
        "torch",
        "workbench.merge.engine",
        "workbench.merge.provenance",
        "workbench.merge.recipe",
        "workbench.lora.ops",
        "workbench.lora.bake",
        "workbench.checkpoint.lora_format",
    ],  # fmt: skip
}


def run_child(tool: str, method: str, inputs: list[Path], out: Path) -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    for module in IMPORTS[tool]:
        importlib.import_module(module)
    import resource

    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    CHILDREN[tool](method, inputs, out)
    seconds = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime}
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    print(json.dumps({"seconds": seconds, "vmhwm_kb": int(status["VmHWM"].split()[0]), **cpu}))


# ---------------------------------------------------------------------------------------------------
# parent


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(python: str, tool: str, method: str, inputs: list[Path], out: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, method, str(out), *map(str, inputs)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    peak_anon = 0
    while proc.poll() is None:
        anon = _status_kb(proc.pid, "RssAnon")
        if anon:
            peak_anon = max(peak_anon, anon)
        time.sleep(0.005)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:200]}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rss_anon_kb"] = peak_anon
    return result


def verify(method: str, inputs: list[Path], out: Path) -> dict:
    """Compare the UNet and text encoder of `out` with the float32 reference, key by key."""
    import torch

    sys.path.insert(0, str(ROOT))
    from workbench.checkpoint.reader import open_checkpoint

    if method == "bake":
        return verify_bake(inputs, out)
    srcs = [open_checkpoint(p) for p in inputs]
    got = open_checkpoint(out)
    worst, exact, total, missing = 0.0, 0, 0, 0
    for key, info in srcs[0].infos.items():
        if not (info.is_float and key.startswith((UNET, TE))):
            continue
        if key not in got:
            missing += 1
            continue
        ref = _merge_expr(method, [s[key] for s in srcs], ALPHA[method])
        o = got[key]
        total += 1
        exact += bool(torch.equal(o, ref.to(o.dtype)))
        worst = max(worst, (o.float() - ref).abs().max().item())
    pos = next((k for k in got.infos if k.endswith("position_ids")), None)
    return {
        "max_err": worst,
        "exact": exact,
        "checked": total,
        "missing": missing,
        "position_ids": got.infos[pos].dtype if pos else "absent",
    }


def verify_bake(inputs: list[Path], out: Path) -> dict:
    """fp16(W + m * alpha/r * up @ down) in float32 per changed key; every other key unchanged."""
    import torch

    from workbench.checkpoint.reader import open_checkpoint

    base, got = open_checkpoint(inputs[0]), open_checkpoint(out)
    binding = _binding(*inputs)
    worst, exact, total, missing = 0.0, 0, 0, 0
    for key in base.infos:
        if key not in got:
            missing += 1
            continue
        if key not in binding.by_key:
            exact += bool(torch.equal(got[key], base[key]))
            total += 1
            continue
        ref = base[key].float()
        binding.apply(key, ref, ALPHA["bake"])
        o = got[key]
        total += 1
        exact += bool(torch.equal(o, ref.to(o.dtype)))
        worst = max(worst, (o.float() - ref).abs().max().item())
    return {"max_err": worst, "exact": exact, "checked": total, "missing": missing, "position_ids": "-"}


def ensure_lora(folder: Path, base: Path) -> Path:
    path = folder / f"sd15_lora_r{LORA_RANK}.safetensors"
    if not path.exists():
        from workbench.lora.synthetic import synthetic_lora

        print(f"writing {path} (rank {LORA_RANK}, attn + conv + te, fp16) ...", flush=True)
        synthetic_lora(path, base, rank=LORA_RANK, alpha=LORA_RANK / 2, std=0.02, dtype="F16")
    return path


def drop_from_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (no root needed; dirty pages were synced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def ensure_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sd15_{i}.safetensors" for i in (1, 2, 3)]
    for seed, p in enumerate(paths, start=1):
        if not p.exists():
            print(f"writing {p} (bench/make_sd15.py --seed {seed}) ...", flush=True)
            subprocess.run(
                [sys.executable, str(ROOT / "bench" / "make_sd15.py"), str(p), "--seed", str(seed)],
                check=True,
            )
    return paths


def _fmt(values: list[float]) -> str:
    return f"{min(values):6.2f} ({statistics.median(values):5.2f})"


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "out" / "merge_bench")
    ap.add_argument("--reps", type=int, default=3, help="runs of floor and wb")
    ap.add_argument("--slow-reps", type=int, default=1, help="runs of naive and sd-mecha (5-20x slower)")
    ap.add_argument("--mecha-python", default="/work/bench-venv/bin/python")
    ap.add_argument("--tools", default="floor,wb,naive,sd-mecha")
    ap.add_argument("--methods", default="weighted,add-diff,bake")
    ap.add_argument(
        "--cache", default="cold,warm",
        help="cold: every input evicted from the page cache before every run (posix_fadvise DONTNEED), so "
        "every tool reads from the disk; warm: every input read once before every run, so it sits in the "
        "page cache (the usual case right after a download or a previous merge); both: one table each",
    )  # fmt: skip
    ap.add_argument("--check", default="wb,naive,sd-mecha", help="tools whose output is checked (once)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, method, out, *inputs = args.child
        run_child(tool, method, [Path(p) for p in inputs], Path(out))
        return

    modes = args.cache.split(",")
    if not set(modes) <= {"cold", "warm"}:
        ap.error(f"--cache: cold, warm or cold,warm, not {args.cache!r}")
    os.environ.setdefault("WB_CACHE_DIR", str(args.dir / "wb-cache"))
    inputs = ensure_inputs(args.dir)
    sys.path.insert(0, str(ROOT))
    from workbench.checkpoint.hashing import sha256_file

    methods = args.methods.split(",")
    lora = ensure_lora(args.dir, inputs[0]) if "bake" in methods else None
    t = time.perf_counter()
    for p in [*inputs, *([lora] if lora else [])]:
        sha256_file(p)
    print(f"sha256 of the inputs (once; cached for wb): {time.perf_counter() - t:.1f} s")
    tools = args.tools.split(",")
    if "sd-mecha" in tools:
        probe = subprocess.run(
            [args.mecha_python, "-c", "import sd_mecha; print(sd_mecha.__name__)"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            print(
                f"note: sd-mecha is not importable by {args.mecha_python}; skipped (install it in a separate "
                "venv: python -m venv /work/bench-venv && /work/bench-venv/bin/pip install sd-mecha==1.1.*)"
            )
            tools.remove("sd-mecha")

    print(f"load average at the start: {_load()} ({os.cpu_count()} cores)", flush=True)
    results: dict[tuple[str, str, str], list[dict]] = {}
    checks: dict[tuple[str, str], dict] = {}
    for mode in modes:
        for method in methods:
            ins = [inputs[0], lora] if method == "bake" else inputs[: N_INPUTS[method]]
            for rep in range(args.reps):
                for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:  # rotate: spread the noise
                    if tool in SLOW_TOOLS and rep >= args.slow_reps:
                        continue
                    out = args.dir / f"out_{tool}_{method}.safetensors"
                    python = args.mecha_python if tool == "sd-mecha" else sys.executable
                    os.sync()
                    time.sleep(1.0)  # let writeback of the previous output finish before timing the next
                    if mode == "cold":
                        drop_from_cache(ins)
                    else:
                        read_into_cache(ins)
                    r = measure(python, tool, method, ins, out)
                    results.setdefault((mode, method, tool), []).append(r)
                    print(f"  {mode} {method:8s} {tool:8s} rep {rep + 1}: {_run_line(r)}", flush=True)
                    if "error" not in r and (method, tool) not in checks and tool in args.check.split(","):
                        checks[(method, tool)] = verify(method, ins, out)
                    out.unlink(missing_ok=True)
    print(f"load average at the end: {_load()}")
    for mode in modes:
        _table(mode, methods, tools, results, checks, args)


def _run_line(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return (
        f"{r['seconds']:.2f} s (CPU user {r['user_s']:.2f} s, sys {r['sys_s']:.2f} s), RssAnon "
        f"{r['rss_anon_kb'] / 1024:.0f} MiB, VmHWM {r['vmhwm_kb'] / 1024:.0f} MiB (load {_load()})"
    )


def _table(mode: str, methods: list[str], tools: list[str], results, checks, args) -> None:
    print()
    print(
        f"{mode} page cache -- wall seconds: fastest (median) of {args.reps} runs ({args.slow_reps} for "
        "naive and sd-mecha); memory: worst run"
    )
    head = (
        f"{'method':9s} {'tool':9s} {'wall s':>15s} {'CPU s':>6s} {'RssAnon MiB':>12s} {'VmHWM MiB':>10s}  "
        f"{'x floor':>7s}  {'check vs fp32 reference'}"
    )
    print(head)
    print("-" * len(head))
    for method in methods:
        best = {}
        for tool in tools:
            runs = [r for r in results.get((mode, method, tool), []) if "error" not in r]
            if not runs:
                err = results.get((mode, method, tool), [{}])[0].get("error", "no run")
                print(f"{method:9s} {tool:9s} failed: {err}")
                continue
            secs = [r["seconds"] for r in runs]
            best[tool] = min(secs)
            anon = max(r["rss_anon_kb"] for r in runs) / 1024
            hwm = max(r["vmhwm_kb"] for r in runs) / 1024
            c = checks.get((method, tool))
            check = (
                "-"
                if c is None
                else f"max|err| {c['max_err']:.2e}, {c['exact']}/{c['checked']} keys == fp16(ref), "
                f"position_ids {c['position_ids']}"
            )
            ratio = f"{best[tool] / best['floor']:.2f}" if "floor" in best else "-"
            fastest = min(runs, key=lambda r: r["seconds"])
            cpu = fastest["user_s"] + fastest["sys_s"]  # user + sys of the fastest run
            row = f"{method:9s} {tool:9s} {_fmt(secs):>15s} {cpu:6.1f} {anon:12.0f} {hwm:10.0f}"
            print(f"{row}  {ratio:>7s}  {check}")
        if "wb" in best:
            parts = [
                f"wb/floor {best['wb'] / best['floor']:.2f} (fastest runs)" if "floor" in best else None,
                f"naive/wb {best['naive'] / best['wb']:.2f}" if "naive" in best else None,
                f"sd-mecha/wb {best['sd-mecha'] / best['wb']:.2f}" if "sd-mecha" in best else None,
            ]
            floors, wbs = results.get((mode, method, "floor"), []), results.get((mode, method, "wb"), [])
            paired = [
                w["seconds"] / f["seconds"] for f, w in zip(floors, wbs, strict=True) if "error" not in f | w
            ]
            if paired:  # wb and the floor of the same round ran back to back: load drifts cancel out
                parts.append(
                    f"wb/floor per round {', '.join(f'{x:.2f}' for x in paired)} "
                    f"(median {statistics.median(paired):.2f})"
                )
            print(f"{'':9s} ratios: " + ", ".join(p for p in parts if p))


if __name__ == "__main__":
    main()
