"""`wb toy pretrain`: make the toy base model that ships as `workbench/toy/base.safetensors`.

A toy model fresh from `toy_init` draws noise, and fine-tuning it in a demo's few minutes cannot fix
that: with a random VAE the latent loss plateaus, because its latents carry little of the image.
So the base is made in two stages, both on the procedural shapes (`workbench.toy.shapes`):

1. The VAE alone, as an autoencoder: reconstruction MSE + L1 and a small KL term, judged by PSNR on
   a fixed held-out set. Its `scaling_factor` is then set to 1 / std of its latents, as SD's was,
   so the UNet sees unit-variance latents; the config travels in the checkpoint's
   `wb.diffusers_configs` metadata, which is where the new value is written.
2. The UNet and text encoder, by `wb train`'s own loop (`workbench.train.loop.train`) with the
   recipe `recipes/toy_pretrain.yaml`, starting from a checkpoint holding that VAE and a fresh
   UNet / text encoder. The recipe file is the whole truth about stage 2; pretrain only overrides
   the base checkpoint, the resolution, the step count and the seed (run.json lists them).

The last checkpoint is written to OUT (fp16, toy metadata, `wb.made_by` naming the command), the run
record to OUT_run/ beside it (the recipe, run.json, metrics.jsonl, pretrain.json, sample images;
no checkpoints), and the result is judged by sampling fixed prompts and scoring the images with
`workbench.toy.shapes.score_image` (`judge_toy`). Library code prints nothing: progress goes to
the `progress` callback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

RECIPE_NAME = "toy_pretrain.yaml"
STAGE1_NAME = "stage1.safetensors"
SIZES = (32, 64)

# Stage 1 settings. The toy VAE (32/64 channels, one downsample) is small enough that a high lr
# trains it in a few hundred steps; the KL weight is per image value, as in SD (where it is 1e-6),
# but larger, to keep the latents closer to a Gaussian for the UNet that has to model them.
VAE_BATCH = 16
VAE_LR = 3e-3
VAE_WARMUP = 20
VAE_KL_WEIGHT = 1e-5
VAE_L1_WEIGHT = 0.5  # L1 keeps edges sharp where MSE alone settles for a blur
VAE_HELD_OUT = 64  # images in the fixed PSNR set
VAE_SCALE_SAMPLES = 256  # images whose latents set the scaling factor
# Seeds of the procedural sets, offset from the run seed so no set overlaps another.
VAE_DATA_SEED, VAE_HELD_SEED, VAE_SCALE_SEED = 1_000, 2_000, 3_000

# The judge: fixed prompts covering every shape and colour, both as foreground and background.
JUDGE_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue cross on a yellow background",
    "a green ring on a white background",
    "a black circle on an orange background",
    "an orange square on a purple background",
    "a purple triangle on a white background",
    "a white circle on a red background",
    "a blue square on an orange background",
    "a yellow cross on a purple background",
    "a red ring on a black background",
    "a green circle on a yellow background",
    "a black square on a white background",
    "an orange triangle on a blue background",
    "a purple circle on a green background",
)
JUDGE_STEPS = 20
JUDGE_CFG = 5.0


@dataclass
class PretrainProgress:
    """What the progress callback gets: after every VAE / UNet step and at each stage change."""

    stage: str  # "vae", "unet", "judge", "done"
    step: int
    total: int
    loss: float | None = None
    note: str | None = None


@dataclass
class VaeRecord:
    """Stage 1: how the VAE was trained and how well it reconstructs the held-out images."""

    image_size: int
    steps: int
    batch_size: int
    lr: float
    kl_weight: float
    l1_weight: float
    psnr_before: float  # dB on the held-out set, the random VAE
    psnr: float  # dB after training
    scaling_factor: float
    latent_mean: float
    latent_std: float  # of the unscaled latents; scaling_factor = 1 / this
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, reconstruction loss)


@dataclass
class JudgeResult:
    """Sampled images scored against their prompts (`score_image`) and read back (`classify_image`).

    Means are over images; `chance_*` are the same means with each image scored against another
    prompt's caption (a fixed derangement), the level a model that ignores its prompt would reach.
    Accuracies count images whose classified shape / fg / bg equal the prompt's; `accuracy` needs
    all three; `circle_square` is the shape accuracy over the circle and square prompts alone.
    """

    image_size: int
    steps: int
    cfg: float
    seeds: list[int]
    background: float
    foreground: float
    shape: float
    total: float
    chance_background: float
    chance_foreground: float
    chance_shape: float
    background_accuracy: float
    foreground_accuracy: float
    shape_accuracy: float
    accuracy: float
    circle_square: float
    images: list[dict] = field(default_factory=list)  # per image: prompt, seed, scores, classified


@dataclass
class PretrainResult:
    path: Path
    record_dir: Path
    workdir: Path
    made_by: str
    seed: int
    image_size: int
    vae: VaeRecord
    unet_steps: int
    unet_steps_per_second: float
    last_loss: float | None
    val_loss: float | None
    judge: JudgeResult | None
    seconds: float
    vae_seconds: float
    unet_seconds: float


def toy_base_path() -> Path:
    """The shipped toy base model (made by `wb toy pretrain`, see docs/toy.md)."""
    from importlib.resources import files

    path = Path(str(files("workbench.toy").joinpath("base.safetensors")))
    if not path.is_file():
        raise WorkbenchError(f"{path}: the toy base model is missing from this install of wb")
    return path


def default_recipe() -> Path:
    """recipes/toy_pretrain.yaml in a source checkout, else the copy shipped in base_run/."""
    repo = Path(__file__).resolve().parents[2] / "recipes" / RECIPE_NAME
    if repo.is_file():
        return repo
    return Path(__file__).resolve().parent / "base_run" / "recipe.yaml"


# --- stage 1: the VAE ---------------------------------------------------------------------------


def _images(dataset, start: int, count: int) -> torch.Tensor:
    return torch.stack([dataset[start + i][0] for i in range(count)])


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """PSNR (dB) of the VAE's reconstructions (latent mean, decoded, clipped) over images in [-1, 1]."""
    was_training = vae.training
    vae.eval()
    sq_err = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        sq_err += float(((y - x) / 2).pow(2).sum())  # / 2: PSNR on the [0, 1] scale
    vae.train(was_training)
    mse = sq_err / images.numel()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, seed: int, batch_size: int = 32) -> tuple[float, float]:
    """(mean, std) of latent samples of `images`, over every value, as SD measured its scale."""
    was_training = vae.training
    vae.eval()
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size]).latent_dist
        chunks.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g))
    vae.train(was_training)
    z = torch.cat(chunks)
    return float(z.mean()), float(z.std())


def train_vae(
    vae,
    image_size: int,
    steps: int,
    seed: int,
    batch_size: int = VAE_BATCH,
    lr: float = VAE_LR,
    kl_weight: float = VAE_KL_WEIGHT,
    l1_weight: float = VAE_L1_WEIGHT,
    progress: Callable[[PretrainProgress], None] | None = None,
) -> VaeRecord:
    """Train `vae` in place on fresh shapes images (every image seen once); set nothing else.

    Loss = MSE + l1_weight * L1 (images in [-1, 1]) + kl_weight * KL per image value. AdamW with a
    short warmup and a cosine decay; every random number comes from generators seeded by `seed`.
    """
    import torch.nn.functional as F

    from workbench.toy.shapes import ShapesDataset

    started = time.perf_counter()
    held = _images(ShapesDataset(VAE_HELD_OUT, seed=seed + VAE_HELD_SEED, size=image_size), 0, VAE_HELD_OUT)
    psnr_before = reconstruction_psnr(vae, held)
    data = ShapesDataset(steps * batch_size, seed=seed + VAE_DATA_SEED, size=image_size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(VAE_WARMUP, max(1, steps // 10))

    def factor(i: int) -> float:
        return min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / max(1, steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    vae.train()
    losses = []
    for step in range(steps):
        x = _images(data, step * batch_size, batch_size)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        y = vae.decode(z).sample
        rec = F.mse_loss(y, x) + l1_weight * F.l1_loss(y, x)
        loss = rec + kl_weight * dist.kl().sum() / x.numel()
        if not torch.isfinite(loss):
            raise WorkbenchError(
                f"VAE stage: loss is {loss.item()} at step {step + 1}; try fewer --vae-steps"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            losses.append((step + 1, round(rec.item(), 6)))
        if progress is not None:
            progress(PretrainProgress("vae", step + 1, steps, loss=rec.item()))
    vae.eval()
    psnr = reconstruction_psnr(vae, held)
    scale_set = ShapesDataset(VAE_SCALE_SAMPLES, seed=seed + VAE_SCALE_SEED, size=image_size)
    mean, std = latent_stats(vae, _images(scale_set, 0, VAE_SCALE_SAMPLES), seed)
    return VaeRecord(
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        kl_weight=kl_weight,
        l1_weight=l1_weight,
        psnr_before=round(psnr_before, 3),
        psnr=round(psnr, 3),
        scaling_factor=round(1.0 / std, 5),
        latent_mean=round(mean, 5),
        latent_std=round(std, 5),
        seconds=round(time.perf_counter() - started, 1),
        losses=losses,
    )


def write_stage1(path: Path, vae, scaling_factor: float, seed: int) -> dict:
    """A toy checkpoint with the trained VAE (its scaling factor in the configs) and a fresh UNet and
    text encoder from `toy_components(seed)`. Returns the configs it records."""
    from workbench.checkpoint.convert import diffusers_to_ldm
    from workbench.checkpoint.safetensors_io import save_tensors
    from workbench.toy.model import toy_components, toy_configs, toy_metadata

    configs = toy_configs()
    configs["vae"]["scaling_factor"] = scaling_factor
    fresh = toy_components(seed)
    states = {
        "unet": fresh["unet"].state_dict(),
        "vae": {k: v.detach().float() for k, v in vae.state_dict().items()},
        "text_encoder": fresh["text_encoder"].state_dict(),
    }
    ldm = diffusers_to_ldm(states, "sd1", configs)
    save_tensors(path, ldm, toy_metadata(configs, f"wb toy pretrain stage 1 (VAE) --seed {seed}"))
    return configs


# --- the judge ----------------------------------------------------------------------------------


def judge_toy(
    checkpoint: str | os.PathLike,
    image_size: int,
    prompts: Sequence[str] = JUDGE_PROMPTS,
    seeds: Sequence[int] = (0,),
    steps: int = JUDGE_STEPS,
    cfg: float = JUDGE_CFG,
    save_grid: str | os.PathLike | None = None,
) -> JudgeResult:
    """Sample every prompt with every seed from `checkpoint` and score the images (see JudgeResult).

    One pipeline call per seed, all prompts batched; image i of seed s uses a generator seeded by
    s * 1000 + i, so a result does not depend on how many prompts are judged alongside.
    """
    from workbench.pipeline import build_pipeline
    from workbench.toy.shapes import classify_image, parse_caption, score_image

    pipe = build_pipeline(checkpoint)
    rows = []
    images = []
    for seed in seeds:
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            out = pipe(
                list(prompts),
                num_inference_steps=steps,
                guidance_scale=cfg,
                height=image_size,
                width=image_size,
                generator=generators,
            ).images
        for i, (prompt, image) in enumerate(zip(prompts, out, strict=True)):
            shape, fg, bg = parse_caption(prompt)
            score = score_image(image, prompt)
            # Chance: the same image scored against the next prompt's caption (a derangement).
            other = prompts[(i + 1) % len(prompts)]
            chance = score_image(image, other) if len(prompts) > 1 else score
            got = classify_image(image)
            rows.append(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "background": round(score.background, 4),
                    "foreground": round(score.foreground, 4),
                    "shape": round(score.shape, 4),
                    "chance": [
                        round(chance.background, 4),
                        round(chance.foreground, 4),
                        round(chance.shape, 4),
                    ],
                    "classified": list(got),
                    "right": [got[0] == shape, got[1] == fg, got[2] == bg],
                }
            )
            images.append(image)
    if save_grid is not None:
        _save_grid(images, len(prompts), Path(save_grid))

    def mean(values) -> float:
        values = list(values)
        return round(sum(values) / len(values), 4) if values else 0.0

    pairs = [r for r in rows if parse_caption(r["prompt"])[0] in ("circle", "square")]
    return JudgeResult(
        image_size=image_size,
        steps=steps,
        cfg=cfg,
        seeds=list(seeds),
        background=mean(r["background"] for r in rows),
        foreground=mean(r["foreground"] for r in rows),
        shape=mean(r["shape"] for r in rows),
        total=mean((r["background"] + r["foreground"] + r["shape"]) / 3 for r in rows),
        chance_background=mean(r["chance"][0] for r in rows),
        chance_foreground=mean(r["chance"][1] for r in rows),
        chance_shape=mean(r["chance"][2] for r in rows),
        background_accuracy=mean(r["right"][2] for r in rows),
        foreground_accuracy=mean(r["right"][1] for r in rows),
        shape_accuracy=mean(r["right"][0] for r in rows),
        accuracy=mean(all(r["right"]) for r in rows),
        circle_square=mean(r["right"][0] for r in pairs),
        images=rows,
    )


def _save_grid(images: list, columns: int, path: Path) -> None:
    from PIL import Image

    w, h = images[0].size
    columns = min(columns, 8)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# --- the whole thing ----------------------------------------------------------------------------


def made_by_command(seed: int, image_size: int, vae_steps: int, unet_steps: int) -> str:
    return f"wb toy pretrain --seed {seed} --size {image_size} --vae-steps {vae_steps} --steps {unet_steps}"


def pretrain_toy(
    out_path: str | os.PathLike,
    workdir: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    vae_steps: int = 800,
    unet_steps: int | None = None,
    progress: Callable[[PretrainProgress], None] | None = None,
    *,
    recipe: str | os.PathLike | None = None,
    record_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    judge: bool = True,
) -> PretrainResult:
    """Make a toy base model: train the VAE, then the UNet and text encoder (see the module doc).

    `workdir` (new or empty) keeps everything the run made, checkpoints included; OUT gets the last
    checkpoint and `record_dir` (default: OUT's name + "_run" beside it, replaced if it exists) the
    small run record. `unet_steps` None keeps the recipe's training.max_steps. `threads` sets
    torch's CPU threads for the run (on a busy machine 1 can be several times faster than 2).
    """
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.checkpoint.safetensors_io import save_tensors
    from workbench.toy.model import toy_components, toy_metadata
    from workbench.train.loop import train
    from workbench.train.recipe import load_recipe

    started = time.perf_counter()
    out_path, workdir = Path(out_path), Path(workdir)
    if image_size not in SIZES:
        raise WorkbenchError(
            f"--size {image_size}: the toy base is trained at {' or '.join(map(str, SIZES))} px"
        )
    if vae_steps < 1:
        raise WorkbenchError(f"--vae-steps {vae_steps}: must be at least 1")
    if unet_steps is not None and unet_steps < 1:
        raise WorkbenchError(f"--steps {unet_steps}: must be at least 1")
    if out_path.suffix != ".safetensors":
        raise WorkbenchError(f"{out_path}: the output must be a .safetensors file")
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise WorkbenchError(f"{workdir}: exists and is not an empty folder; choose another --workdir")
    recipe_path = Path(recipe) if recipe is not None else default_recipe()
    record_dir = Path(record_dir) if record_dir is not None else out_path.with_name(out_path.stem + "_run")
    # Resolve the stage-2 recipe before any training, so a bad one fails in a second, not in minutes.
    stage1 = workdir / STAGE1_NAME
    overrides = [f"model.base={stage1}", f"data.resolution={image_size}", f"training.seed={seed}"]
    if unet_steps is not None:
        overrides.append(f"training.max_steps={unet_steps}")
    stage2 = load_recipe(recipe_path, overrides)
    recipe_text = recipe_path.read_text(encoding="utf-8")
    unet_steps = stage2.training.max_steps or 0

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = toy_components(seed)["vae"]
            vae_record = train_vae(vae, image_size, vae_steps, seed, progress=progress)
        configs = write_stage1(stage1, vae, vae_record.scaling_factor, seed)
        del vae

        def unet_progress(p) -> None:
            if progress is not None:
                note = f"val {p.val_loss:.4f}" if p.val_loss is not None else p.note
                progress(PretrainProgress("unet", p.step, p.total_steps, loss=p.loss, note=note))

        source = {"recipe": str(recipe_path), "overrides": overrides, "by": "wb toy pretrain"}
        run = train(stage2, workdir / "unet_run", progress=unet_progress, source=source)
        if run.stopped == "interrupted":  # a half-trained base is not a base
            raise KeyboardInterrupt
        if run.stopped == "nan" or not run.checkpoints:
            raise WorkbenchError(f"UNet stage: {run.message}")

        made_by = made_by_command(seed, image_size, vae_steps, unet_steps)
        with open_checkpoint(run.checkpoints[-1]) as ckpt:
            tensors = {k: ckpt[k].clone() for k in ckpt}
        metadata = toy_metadata(configs, made_by)
        metadata["modelspec.title"] = "wb toy base"
        record = {
            "seed": seed,
            "image_size": image_size,
            "vae": {k: v for k, v in asdict(vae_record).items() if k != "losses"},
            "unet_steps": run.steps,
            "val_loss": run.val_losses[-1][1] if run.val_losses else None,
        }
        metadata["wb.toy_pretrain"] = json.dumps(record, sort_keys=True)
        save_tensors(out_path, tensors, metadata)

        judged = None
        staging = Path(str(record_dir) + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if judge:
            if progress is not None:
                progress(PretrainProgress("judge", 0, len(JUDGE_PROMPTS), note="sampling the judge prompts"))
            judged = judge_toy(out_path, image_size, save_grid=staging / "judge.png")
            # The file then says how good it is, where `wb inspect` shows it.
            record["judge"] = {k: v for k, v in asdict(judged).items() if k != "images"}
            metadata["wb.toy_pretrain"] = json.dumps(record, sort_keys=True)
            save_tensors(out_path, tensors, metadata)
        seconds = time.perf_counter() - started
        result = PretrainResult(
            path=out_path,
            record_dir=record_dir,
            workdir=workdir,
            made_by=made_by,
            seed=seed,
            image_size=image_size,
            vae=vae_record,
            unet_steps=run.steps,
            unet_steps_per_second=round(run.steps_per_second, 3),
            last_loss=run.last_loss,
            val_loss=record["val_loss"],
            judge=judged,
            seconds=round(seconds, 1),
            vae_seconds=vae_record.seconds,
            unet_seconds=round(run.seconds, 1),
        )
        _write_record(staging, result, recipe_text, run.run_dir)
        shutil.rmtree(record_dir, ignore_errors=True)
        os.replace(staging, record_dir)
    finally:
        torch.set_num_threads(old_threads)
    if progress is not None:
        progress(PretrainProgress("done", 1, 1))
    return result


def _write_record(folder: Path, result: PretrainResult, recipe_text: str, run_dir: Path) -> None:
    """The small run record: the recipe (as read when the run started), the loop's run.json and
    metrics, pretrain.json, samples."""
    (folder / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    for name in ("run.json", "metrics.jsonl"):
        shutil.copyfile(run_dir / name, folder / name)
    for png in sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []:
        shutil.copyfile(png, folder / f"sample-{png.name}")
    summary = asdict(result)
    summary = json.loads(json.dumps(summary, default=str))
    summary["command"] = result.made_by
    (folder / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
