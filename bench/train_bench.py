"""wb's training loop against a minimal hand-written diffusers loop: steps/s and peak memory.

    python bench/train_bench.py [--steps 60] [--reps 3]          # CPU: the toy model, 32 px, batch 2
    python bench/train_bench.py --gpu [--steps 30]               # CUDA: SD1.5-size random weights
    python bench/train_bench.py --scaleout [--steps 40]          # toy CPU: 1 vs 2 processes, cache on/off
    python bench/train_bench.py --scaleout --gpu                 # CUDA, SD1.5 size: cache on vs off

CPU mode runs, in one invocation, both loops on the same toy data (toy:shapes, 96 images), batch,
optimizer (AdamW, UNet and text encoder each with its own) and seed, each in a fresh process
(so peak RSS is per loop), alternating wb / hand `--reps` times so machine load hits both alike.
Steps/s is measured from the end of the first `--warmup` steps to the last step, data loading
included, validation and saving off (wb saves once at the end, after the clock stops).
Target: wb's overhead under 10%.

Scale-out mode runs `wb train` from the command line, each run a fresh process, alternating the
variants `--reps` times: the toy with a global batch of 4 as 1 process (batch 4) and as
`--processes 2` (batch 2 each), steps/s and the whole command's wall time; and 1 process with
`data.cache_latents` off vs memory. On a 2-core machine 2 processes show the overhead (startup,
gloo all-reduce of every gradient, two processes on two cores), not a speed-up.

GPU mode trains an SD1.5-size model with random weights (bench/make_sd15.py) at 512 px, batch 4,
gradient checkpointing and bf16 with adamw8bit, dadapt_adam and prodigy through wb, and reports
steps/s and peak VRAM (torch.cuda.max_memory_allocated). Targets (issue 6): dadapt_adam under
20 GB, its step time within 1.2x of adamw8bit's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_IMAGES, RESOLUTION, BATCH, LR, TE_LR, SEED = 96, 32, 2, 2e-4, 1e-4, 555


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate(times: list[float], warmup: int) -> float:
    """Steps per second between the end of step `warmup` and the end of the last step."""
    done = times[warmup - 1 :]
    return (len(done) - 1) / (done[-1] - done[0])


def run_wb(
    base: str, steps: int, warmup: int, out: Path, optimizer: str = "adamw", gpu: bool = False,
    network_dim: int = 0,
) -> dict:  # fmt: skip
    from workbench.train.loop import train
    from workbench.train.recipe import parse_recipe
    from workbench.train.runs import read_metrics

    recipe = {
        "model": {"base": base},
        "data": {"root": "toy:shapes", "resolution": 512 if gpu else RESOLUTION, "toy": {"n": N_IMAGES}},
        "validation": {"enabled": False},
        "optimizer": {
            "name": optimizer,
            "lr": 1.0 if optimizer in ("dadapt_adam", "prodigy") else LR,
            "text_encoder": {"lr": 0.5 if optimizer in ("dadapt_adam", "prodigy") else TE_LR},
        },
        "training": {
            "max_steps": steps,
            "batch_size": 4 if gpu else BATCH,
            "seed": SEED,
            "gradient_checkpointing": gpu,
            "device": "auto" if gpu else "cpu",
        },
        "saving": {"every_n_epochs": None},
        "logging": {"tensorboard": False, "every_n_steps": 1},
    }
    if network_dim:  # a LoRA (kohya's default modules, alpha = dim) at ~100x a fine-tune's lr
        recipe["network"] = {"type": "lora", "dim": network_dim}
        if optimizer not in ("dadapt_adam", "prodigy"):
            lrs = (1e-4, 5e-5) if gpu else (100 * LR, 100 * TE_LR)
            recipe["optimizer"].update(lr=lrs[0], text_encoder={"lr": lrs[1]})
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    done = train(parse_recipe(recipe, "bench"), out)
    times = [m["time"] for m in read_metrics(out) if "loss/train" in m]
    result = {
        "loop": "wb" + (f" LoRA r{network_dim}" if network_dim else ""),
        "optimizer": optimizer,
        "steps_per_s": rate(times, warmup),
        "peak_rss_mb": peak_rss_mb(),
        "checkpoint_mb": done.checkpoints[-1].stat().st_size / 2**20 if done.checkpoints else None,
    }
    if gpu:
        import torch

        result["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_hand(base: str, steps: int, warmup: int) -> dict:
    """The loop a diffusers user would write: nothing but the training step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from workbench.pipeline import load_modules
    from workbench.tokenizer import clip_tokenizer
    from workbench.toy.shapes import ShapesDataset

    torch.manual_seed(SEED)
    m = load_modules(base)
    unet, te, vae = m["unet"], m["text_encoder"], m["vae"]
    unet.requires_grad_(True).train()
    te.requires_grad_(True).train()
    tokenizer = clip_tokenizer()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opts = [
        torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.01),
        torch.optim.AdamW(te.parameters(), lr=TE_LR, weight_decay=0.01),
    ]
    loader = torch.utils.data.DataLoader(
        ShapesDataset(N_IMAGES, 0, size=RESOLUTION), batch_size=BATCH, shuffle=True
    )
    times: list[float] = []
    while len(times) < steps:
        for pixels, captions in loader:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * 0.18215
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],))
            ids = tokenizer(
                list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            pred = unet(sched.add_noise(latents, noise, t), t, te(ids)[0]).sample
            F.mse_loss(pred, noise).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            times.append(time.time())
            if len(times) == steps:
                break
    return {
        "loop": "hand",
        "optimizer": "adamw",
        "steps_per_s": rate(times, warmup),
        "peak_rss_mb": peak_rss_mb(),
    }


def child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if args.child == "wb":
        result = run_wb(args.base, args.steps, args.warmup, Path(args.out), args.optimizer, args.gpu,
                        args.network_dim)  # fmt: skip
    else:
        result = run_hand(args.base, args.steps, args.warmup)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(
    kind: str, base: str, args, out: Path | None = None, optimizer: str = "adamw", network_dim: int = 0
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--base",
        base,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--optimizer",
        optimizer,
    ] + (["--out", str(out)] if out else [])
    cmd += ["--gpu"] if args.gpu else []
    cmd += ["--network-dim", str(network_dim)] if network_dim else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def scaleout(args, tmp: Path, base: str) -> None:
    """1 vs 2 processes and cache off vs memory, `wb train` from the command line (see the docstring)."""
    import yaml

    gpu = args.gpu
    steps = args.steps

    def recipe(batch: int, cache: str) -> Path:
        raw = {
            "model": {"base": base},
            "data": {"root": "toy:shapes", "resolution": 512 if gpu else RESOLUTION,
                     "toy": {"n": N_IMAGES}, "flip_p": 0.5, "cache_latents": cache},  # fmt: skip
            "validation": {"enabled": False},
            "optimizer": {"name": "adamw8bit" if gpu else "adamw", "lr": LR, "text_encoder": {"lr": TE_LR}},
            "training": {"max_steps": steps, "batch_size": batch, "seed": SEED,
                         "gradient_checkpointing": gpu, "device": "auto" if gpu else "cpu"},  # fmt: skip
            "saving": {"every_n_epochs": None},
            "logging": {"tensorboard": False, "every_n_steps": 1},
        }
        path = tmp / f"b{batch}-{cache}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    from workbench.train.runs import read_metrics

    def run(name: str, path: Path, processes: int, rep: int) -> dict:
        out = tmp / f"{name}-{rep}"
        cmd = [sys.executable, "-m", "workbench.cli", "train", str(path), "-o", str(out)]
        cmd += ["--processes", str(processes)] if processes > 1 else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        started = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - started
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        times = [m["time"] for m in read_metrics(out) if "loss/train" in m]
        return {"steps_per_s": rate(times, args.warmup), "wall_s": wall}

    batch = 4 if gpu else 2
    variants = {
        "cache off": (recipe(batch, "off"), 1),
        "cache memory": (recipe(batch, "memory"), 1),
    }
    if not gpu:
        variants = {"1 process, batch 4": (recipe(4, "off"), 1),
                    "2 processes, batch 2 each": (recipe(2, "off"), 2), **variants}  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for rep in range(args.reps):
        names = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in names:
            path, processes = variants[name]
            results[name].append(run(name.replace(" ", "_").replace(",", ""), path, processes, rep))
    for name, rows in results.items():
        speed = statistics.median(r["steps_per_s"] for r in rows)
        wall = statistics.median(r["wall_s"] for r in rows)
        each = ", ".join(f"{r['steps_per_s']:.2f}" for r in rows)
        print(f"{name:28s} {speed:6.2f} steps/s (median of {each})  command {wall:5.1f} s")
    med = {name: statistics.median(r["steps_per_s"] for r in rows) for name, rows in results.items()}
    if not gpu:
        ratio = med["2 processes, batch 2 each"] / med["1 process, batch 4"]
        print(f"2 processes / 1 process: {ratio:.2f}x steps/s at the same global batch")
    print(f"cache memory / off: {med['cache memory'] / med['cache off']:.2f}x steps/s")
    size = "512 px SD1.5-size" if gpu else f"{RESOLUTION} px toy"
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {steps} steps, {size}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--scaleout", action="store_true", help="1 vs 2 processes; latent cache on vs off")
    ap.add_argument("--optimizers", default="adamw8bit,dadapt_adam,prodigy")
    ap.add_argument("--child", choices=["wb", "hand"])
    ap.add_argument("--base")
    ap.add_argument("--out")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--network-dim", type=int, default=0, help="child: train a LoRA of this rank")
    ap.add_argument("--lora", type=int, default=16, help="rank of the LoRA rows (0: none)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="wb-train-bench-") as tmp:
        tmp = Path(tmp)
        if args.scaleout:
            if args.gpu:
                sys.path.insert(0, str(Path(__file__).parent))
                from make_sd15 import write_sd15

                base = str(write_sd15(tmp / "sd15.safetensors"))
            else:
                from workbench.toy.model import toy_init

                base = str(toy_init(tmp / "base.safetensors", seed=0))
            return scaleout(args, tmp, base)
        if args.gpu:
            sys.path.insert(0, str(Path(__file__).parent))
            from make_sd15 import write_sd15

            base = str(write_sd15(tmp / "sd15.safetensors"))
            rows = [spawn("wb", base, args, tmp / f"run-{o}", o) for o in args.optimizers.split(",")]
            if args.lora:  # the GPU rows: an SD1.5-size LoRA (rank 32 by default there)
                rows += [spawn("wb", base, args, tmp / f"lora-{o}", o, args.lora)
                         for o in args.optimizers.split(",")]  # fmt: skip
            for r in rows:
                vram = r["peak_vram_gb"]
                print(f"{r['loop']:12s} {r['optimizer']:12s} {r['steps_per_s']:.3f} steps/s  "
                      f"peak VRAM {vram:.1f} GiB")  # fmt: skip
            print(json.dumps(rows))
            return
        from workbench.toy.model import toy_init

        base = str(toy_init(tmp / "base.safetensors", seed=0))
        results: dict[str, list[dict]] = {"wb": [], "hand": []}
        for rep in range(args.reps):
            for kind in ("wb", "hand") if rep % 2 == 0 else ("hand", "wb"):
                results[kind].append(spawn(kind, base, args, tmp / f"run-{rep}" if kind == "wb" else None))
        wb = statistics.median(r["steps_per_s"] for r in results["wb"])
        hand = statistics.median(r["steps_per_s"] for r in results["hand"])
        for kind, speed in (("wb", wb), ("hand", hand)):
            rss = max(r["peak_rss_mb"] for r in results[kind])
            runs = ", ".join(f"{r['steps_per_s']:.2f}" for r in results[kind])
            print(f"{kind:5s} {speed:6.2f} steps/s (median of {runs})  peak RSS {rss:.0f} MB")
        setup = f"{os.cpu_count()} CPUs, {args.steps} steps, batch {BATCH}, {RESOLUTION} px"
        load = os.getloadavg()[0]
        print(
            f"wb overhead: {100 * (hand / wb - 1):+.1f}% step time (target < 10%); {setup}, load {load:.1f}"
        )
        if args.lora:
            # a rank-`lora` LoRA vs the full fine-tune, same data, batch, seed; interleaved with a
            # fresh full fine-tune each rep, so machine load hits both alike
            pairs = []
            for rep in range(args.reps):
                lora = spawn("wb", base, args, tmp / f"lora-{rep}", "adamw", args.lora)
                full = spawn("wb", base, args, tmp / f"full-{rep}")
                pairs.append((lora, full))
            sides = (("full", [f for _, f in pairs]), (f"LoRA r{args.lora}", [lo for lo, _ in pairs]))
            for name, runs in sides:
                speed = statistics.median(r["steps_per_s"] for r in runs)
                rss = max(r["peak_rss_mb"] for r in runs)
                size = runs[0]["checkpoint_mb"]
                print(f"wb {name:9s} {speed:6.2f} steps/s  peak RSS {rss:.0f} MB  "
                      f"checkpoint {size:.2f} MiB (fp16)")  # fmt: skip
            ratio = statistics.median(lo["steps_per_s"] / f["steps_per_s"] for lo, f in pairs)
            print(f"LoRA r{args.lora} / full fine-tune: {ratio:.2f}x steps/s (median of {args.reps} pairs)")


if __name__ == "__main__":
    main()
