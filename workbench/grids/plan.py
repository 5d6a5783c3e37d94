"""The plan of a grid, made before any model is loaded: its axes, every cell, and what it will cost.

Cells are numbered in reading order (sub-grid, then row, then column), which is also the order of
`cells/NNNN.png`. Rendering goes in a different order, `Plan.render_order`: checkpoint outermost,
so each model is loaded once, then cells that share steps, CFG and sampler, so they can batch.
Seed -1 is resolved here, once, so every cell of that seed gets the same noise and the plan
records the seed actually used.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.grids import layout
from workbench.grids.axes import (
    KIND_REGISTRY,
    MAX_AXIS_VALUES,
    Axis,
    checkpoint_names,
    format_number,
    kinds,
    label_for,
)
from workbench.grids.lora_apply import cell_loras, check_cells, lora_plan, with_axis_lora
from workbench.grids.samplers import effective_schedule, resolve_schedule, scheduler_options, split_sampler

POSITIONS = ("x", "y", "z")
MAX_MEGAPIXELS = 200.0  # A1111 refuses larger grids; so do we, unless --force
MAX_CELLS = 100_000  # even with --force: the plan lists every cell


@dataclass
class GridRequest:
    """What the user asked for. Every list may hold one value (fixed) or several (an axis)."""

    checkpoints: list[Path]
    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [-1])
    cfgs: list[float] = field(default_factory=lambda: [7.0])
    steps: list[int] = field(default_factory=lambda: [25])
    samplers: list[str] = field(default_factory=lambda: ["euler_a"])
    sr: list[str] = field(default_factory=list)  # prompt S/R: the search text, then its replacements
    negative: str = ""
    width: int = 512
    height: int = 512
    axes: dict[str, str] = field(default_factory=dict)  # explicit position -> kind, from --x/--y/--z
    schedulers: list[str] = field(default_factory=lambda: ["automatic"])
    # None: the checkpoint's own VAE; "automatic": A1111's, a <stem>.vae.* file beside the checkpoint if any
    vaes: list[Path | str | None] = field(default_factory=lambda: [None])
    clip_skips: list[int] = field(default_factory=lambda: [1])  # A1111 units: 1 = the last layer
    subseeds: list[int] = field(default_factory=lambda: [-1])  # variation seeds (-1: drawn once)
    subseed_strengths: list[float] = field(default_factory=lambda: [0.0])
    prompt_order: list[tuple[str, ...]] = field(default_factory=list)  # orders of tokens (permutations)
    texts: dict[str, str] = field(default_factory=dict)  # kind -> the text its values came from
    # Values of kinds registered elsewhere (axes.register_kind): kind -> values; each cell gets its
    # own in Cell.extra. A kind with no entry here has the single value None.
    extra: dict[str, list] = field(default_factory=dict)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # several: a size axis (else width x height)
    # The LoRA axes are registered kinds (grids/lora_apply.py): extra["lora"] holds LoRA files or
    # "none", extra["lora_weight"] their strengths. These folders are where <lora:NAME> tags are found.
    lora_dirs: list[Path] = field(default_factory=list)

    def values(self, kind: str) -> list:
        if kind in self.extra or kind not in _BUILT_IN:
            return self.extra.get(kind, [None])
        return {
            "checkpoint": self.checkpoints,
            "prompt": self.prompts,
            "seed": self.seeds,
            "sr": self.sr,
            "cfg": self.cfgs,
            "steps": self.steps,
            "sampler": self.samplers,
            "scheduler": self.schedulers,
            "vae": self.vaes,
            "clip_skip": self.clip_skips,
            "subseed": self.subseeds,
            "subseed_strength": self.subseed_strengths,
            "prompt_order": self.prompt_order,
            "size": self.sizes or [(self.width, self.height)],
        }[kind]


_BUILT_IN = {
    "checkpoint", "prompt", "seed", "sr", "cfg", "steps", "sampler", "scheduler", "vae", "clip_skip",
    "subseed", "subseed_strength", "prompt_order", "size",
}  # fmt: skip


@dataclass
class Cell:
    index: int  # the file number: reading order, sub-grid then row then column
    x: int
    y: int
    z: int
    checkpoint: Path
    checkpoint_name: str
    prompt: str
    negative: str
    seed: int
    cfg: float
    steps: int
    sampler: str  # short key, e.g. euler_a
    width: int
    height: int
    scheduler: str = "automatic"  # the schedule type asked for (A1111's name)
    vae: Path | None = None  # a VAE file or a checkpoint whose VAE is used; None: the checkpoint's own
    clip_skip: int = 1
    subseed: int = 0
    subseed_strength: float = 0.0
    extra: dict = field(default_factory=dict)  # the values of registered kinds (GridRequest.extra)
    loras: tuple[tuple[str, float, float], ...] = ()  # (file, te, unet) from the prompt's <lora:> tags

    @property
    def file(self) -> str:
        return f"cells/{self.index:04d}.png"

    def batch_key(self) -> tuple:
        """Cells with the same key can be sampled in one pipeline call."""
        extra = tuple((k, repr(v)) for k, v in sorted(self.extra.items()))
        return (self.steps, self.cfg, self.sampler, self.scheduler, self.width, self.height, self.loras,
                extra)  # fmt: skip


@dataclass
class Plan:
    axes: dict[str, Axis | None]  # "x", "y", "z" -> the axis there, or None
    cells: list[Cell]
    checkpoints: list[Path]  # in render order: each loaded once
    geometry: layout.Geometry
    resolved_seeds: dict[int, int]  # position in --seeds of a -1 -> the seed drawn for it

    @property
    def images(self) -> int:
        return len(self.cells)

    @property
    def total_steps(self) -> int:
        return sum(c.steps for c in self.cells)

    @property
    def megapixels(self) -> float:
        return self.geometry.width * self.geometry.height / 1e6

    def render_order(self) -> list[Cell]:
        """Checkpoint outermost (one load each), then the VAE, then LoRA sets (applied in place:
        cheap), then batchable cells, then file order."""
        ckpt_rank = {p: i for i, p in enumerate(self.checkpoints)}
        vae_rank = {v: i for i, v in enumerate(dict.fromkeys(c.vae for c in self.cells))}
        return sorted(
            self.cells,
            key=lambda c: (ckpt_rank[c.checkpoint], vae_rank[c.vae], c.loras, c.batch_key(), c.index),
        )

    def shape(self) -> tuple[int, int, int]:
        return tuple(len(self.axes[p]) if self.axes[p] else 1 for p in POSITIONS)  # type: ignore[return-value]


def assign_axes(request: GridRequest) -> dict[str, str | None]:
    """Which kind goes on x, y and z: the explicit --x/--y/--z first, then every other kind with
    several values, in the preferred order (checkpoint, prompt, seed, sr, cfg, steps, sampler)."""
    placed: dict[str, str | None] = {p: None for p in POSITIONS}
    for position, kind in request.axes.items():
        if position not in POSITIONS:
            raise WorkbenchError(f"--{position}: no such axis; use --x, --y or --z")
        if kind not in KIND_REGISTRY:
            raise WorkbenchError(f"--{position} {kind!r}: unknown axis kind; known: {', '.join(kinds())}")
        if kind in placed.values():
            raise WorkbenchError(f"--{position} {kind}: {kind} is already on another axis")
        placed[position] = kind
    if "sr" in placed.values() and not request.sr:
        raise WorkbenchError('--sr: an sr axis needs --sr "search,replacement,..."')
    if "prompt_order" in placed.values() and not request.prompt_order:
        raise WorkbenchError('--prompt-order: a prompt_order axis needs --prompt-order "token1,token2,..."')
    varying = [k for k in kinds() if len(request.values(k)) > 1 and k not in placed.values()]
    for position in POSITIONS:
        if placed[position] is None and varying:
            placed[position] = varying.pop(0)
    if varying:
        flags = " and ".join(KIND_REGISTRY[k].flag for k in varying)
        raise WorkbenchError(
            f"{flags}: several values but no free axis (x, y and z are taken); give a single value "
            "or put it on an axis with --x/--y/--z"
        )
    return placed


def resolve_seeds(
    seeds: list[int], rng: random.Random | None = None, flag: str = "--seeds"
) -> tuple[list[int], dict[int, int]]:
    """Replace each -1 by a random seed, once. Returns the seeds and {position: drawn seed}."""
    rng = rng or random.SystemRandom()
    out, drawn = [], {}
    for i, seed in enumerate(seeds):
        if seed == -1:
            seed = drawn[i] = rng.randrange(2**32)
        elif not 0 <= seed < 2**64:
            raise WorkbenchError(f"{flag} {seed}: a seed is -1 (random) or between 0 and 2^64 - 1")
        out.append(seed)
    return out, drawn


def reorder_prompt(prompt: str, order: tuple[str, ...], tokens: tuple[str, ...]) -> str:
    """A1111's Prompt order: the tokens' slots, in the order they first appear in the prompt, are
    filled with `order` (one ordering of `tokens`, the list as given), left to right."""
    slots = sorted(tokens, key=prompt.find)
    rest, parts = prompt, []
    for token in slots:
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token) :]
    return "".join(part + order[i] for i, part in enumerate(parts)) + rest


def _check_request(request: GridRequest) -> None:
    if not request.checkpoints:
        raise WorkbenchError("--ckpts: give at least one checkpoint")
    seen = set()
    for path in request.checkpoints:
        if not path.exists():
            raise WorkbenchError(f"--ckpts {path}: no such file")
        key = path.resolve()
        if key in seen:
            raise WorkbenchError(f"--ckpts {path}: listed twice")
        seen.add(key)
    if not request.prompts:
        raise WorkbenchError("--prompts: no prompts (the file has no non-empty line)")
    for flag, values in (("--prompts", request.prompts), ("--ckpts", request.checkpoints)):
        if len(values) > MAX_AXIS_VALUES:
            limit = f"over the limit of {MAX_AXIS_VALUES:,} per axis"
            raise WorkbenchError(f"{flag}: {len(values):,} values, {limit}")
    for steps in request.steps:
        if steps < 1:
            raise WorkbenchError(f"--steps {steps}: must be at least 1")
    for cfg in request.cfgs:
        if not 0 <= cfg < math.inf:
            raise WorkbenchError(f"--cfg {cfg:g}: must not be negative")
    for skip in request.clip_skips:
        if not 1 <= skip <= 12:
            raise WorkbenchError(f"--clip-skip {skip}: must be between 1 (the last layer) and 12")
    for strength in request.subseed_strengths:
        if not 0 <= strength <= 1:
            raise WorkbenchError(f"--var-strength {strength:g}: must be between 0 and 1")
    for vae in request.vaes:
        if vae is not None and vae != AUTOMATIC_VAE and not Path(vae).is_file():
            raise WorkbenchError(f"--vae {vae}: no such file")
    for width, height in request.values("size"):
        for side, flag in ((width, "width"), (height, "height")):
            if side < 8 or side % 8:
                raise WorkbenchError(f"--size {width}x{height}: the {flag} must be a multiple of 8")
    if request.sr:
        if len(request.sr) < 2:
            raise WorkbenchError(f"--sr {request.sr[0]!r}: give the search text and at least one replacement")
        search = request.sr[0]
        if not search:
            raise WorkbenchError("--sr: the search text (the first value) is empty")
        if not any(search in p for p in request.prompts) and search not in request.negative:
            raise WorkbenchError(f"--sr: {search!r} is in none of the prompts")
    if request.prompt_order:
        for token in request.prompt_order[0]:
            if not token:
                raise WorkbenchError("--prompt-order: an empty token")
            for prompt in request.prompts:
                if token not in prompt:
                    raise WorkbenchError(f"--prompt-order: {token!r} is not in the prompt {prompt!r}")
    for name in request.samplers:
        split_sampler(name)
    for name in request.schedulers:
        resolve_schedule(name)


AUTOMATIC_VAE = "automatic"
VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


def automatic_vae(checkpoint: Path) -> Path | None:
    """A1111's "Automatic" VAE: a VAE file named like the checkpoint beside it, else its own (None)."""
    stem = Path(checkpoint).with_suffix("") if Path(checkpoint).is_file() else Path(checkpoint)
    for suffix in VAE_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _apply_sr(text: str, search: str | None, value: str | None) -> str:
    # The first S/R value is the search text itself, so its cells keep the original prompt.
    return text if search is None or value is None else text.replace(search, value)


def _sampler_and_schedule(sampler_name: str, schedule_name: str) -> tuple[str, str]:
    """(sampler key, schedule key) of a cell; a sampler name may carry its schedule ("DPM++ 2M Karras")."""
    sampler, named = split_sampler(sampler_name)
    schedule = resolve_schedule(schedule_name)
    if named is not None:
        if schedule.key not in ("automatic", named.key):
            raise WorkbenchError(
                f"--sampler {sampler_name!r} names the schedule type {named.label}, --scheduler says "
                f"{schedule.label}; give the schedule type in one place"
            )
        schedule = named
    scheduler_options(sampler, schedule)  # refuses a pair diffusers cannot follow, before any load
    return sampler.key, schedule.key


def axis_label(kind: str, value, names: dict) -> str:
    """The label of one value on the grid."""
    if kind == "checkpoint":
        return names[value]
    if kind == "sampler":
        return split_sampler(value)[0].display + (
            f" {split_sampler(value)[1].label}" if split_sampler(value)[1] else ""
        )
    if kind == "scheduler":
        return label_for(kind, value, resolve_schedule(value).label)
    if kind == "vae":
        shown = "None" if value is None else "Automatic" if value == AUTOMATIC_VAE else Path(value).name
        return label_for(kind, value, shown)
    if kind == "size":
        return label_for(kind, value, f"{value[0]}x{value[1]}")
    if kind == "subseed_strength":
        return label_for(kind, value, format_number(value))
    if kind == "lora":
        return value or "none"
    return label_for(kind, value)


def make_plan(
    request: GridRequest,
    force: bool = False,
    max_megapixels: float = MAX_MEGAPIXELS,
    rng: random.Random | None = None,
) -> Plan:
    """Check the request, place the axes, list the cells and refuse a grid over `max_megapixels`."""
    _check_request(request)
    placed = assign_axes(request)
    cols, rows, subgrids = (len(request.values(k)) if k else 1 for k in placed.values())
    if cols * rows * subgrids > MAX_CELLS:
        raise WorkbenchError(
            f"the grid would have {cols * rows * subgrids:,} cells ({cols} x {rows} x {subgrids}), over the "
            f"limit of {MAX_CELLS:,}; use fewer values"
        )
    # Cells of several sizes share the largest box; each image sits centred in it.
    cell_w = max(w for w, _ in request.values("size"))
    cell_h = max(h for _, h in request.values("size"))
    geo = layout.geometry(
        cols, rows, subgrids, cell_w, cell_h,
        row_labels=placed["y"] is not None, col_labels=placed["x"] is not None,
        titles=placed["z"] is not None,
    )  # fmt: skip
    if geo.width * geo.height / 1e6 > max_megapixels and not force:
        raise WorkbenchError(
            f"the grid would be {geo.width}x{geo.height} = {geo.width * geo.height / 1e6:.0f} megapixels, "
            f"over the {max_megapixels:.0f} MP limit; use fewer values or a smaller --size, or --force"
        )
    seeds, drawn = resolve_seeds(request.seeds, rng)
    subseeds, _ = resolve_seeds(request.subseeds, rng, flag="--var-seeds")
    names = dict(zip(request.checkpoints, checkpoint_names(request.checkpoints), strict=True))
    lora_names, lookup = lora_plan(request)
    values = {kind: request.values(kind) for kind in (*kinds(), *request.extra)}
    values.update(
        lora=lora_names,
        lora_weight=[float(w) for w in request.extra.get("lora_weight", [1.0])],
        seed=seeds,
        subseed=subseeds,
        sr=request.sr or [None],
        cfg=[float(c) for c in request.cfgs],
        subseed_strength=[float(s) for s in request.subseed_strengths],
        prompt_order=request.prompt_order or [None],
    )

    def axis(kind: str) -> Axis:
        vals = values[kind]
        return Axis(kind, list(vals), [axis_label(kind, v, names) for v in vals], request.texts.get(kind))

    axes = {p: axis(k) if k else None for p, k in placed.items()}
    kind_at = {k: p for p, k in placed.items() if k}
    pairs: dict[tuple[str, str], tuple[str, str]] = {}
    tokens = request.prompt_order[0] if request.prompt_order else ()
    tag_sets: dict[str, tuple] = {}  # prompt -> its resolved <lora:> tags

    cells = []
    for z in range(subgrids):
        for y in range(rows):
            for x in range(cols):
                at = {"x": x, "y": y, "z": z}

                def pick(kind: str, at=at):
                    return values[kind][at[kind_at[kind]]] if kind in kind_at else values[kind][0]

                search = request.sr[0] if request.sr else None
                replacement = pick("sr")
                ckpt = pick("checkpoint")
                key = (pick("sampler"), pick("scheduler"))
                if key not in pairs:
                    pairs[key] = _sampler_and_schedule(*key)
                sampler, scheduler = pairs[key]
                prompt, order = pick("prompt"), pick("prompt_order")
                if order is not None:
                    prompt = reorder_prompt(prompt, order, tokens)
                prompt = _apply_sr(prompt, search, replacement)
                prompt = with_axis_lora(prompt, pick("lora"), pick("lora_weight"))
                if prompt not in tag_sets:
                    tag_sets[prompt] = cell_loras(prompt, lookup)
                cells.append(
                    Cell(
                        index=len(cells),
                        x=x,
                        y=y,
                        z=z,
                        checkpoint=ckpt,
                        checkpoint_name=names[ckpt],
                        prompt=prompt,
                        negative=_apply_sr(request.negative, search, replacement),
                        seed=pick("seed"),
                        cfg=pick("cfg"),
                        steps=pick("steps"),
                        sampler=sampler,
                        width=pick("size")[0],
                        height=pick("size")[1],
                        scheduler=scheduler,
                        vae=automatic_vae(ckpt) if pick("vae") == AUTOMATIC_VAE else pick("vae"),
                        clip_skip=pick("clip_skip"),
                        subseed=pick("subseed"),
                        subseed_strength=pick("subseed_strength"),
                        extra={k: pick(k) for k in request.extra},
                        loras=tag_sets[prompt],
                    )  # fmt: skip
                )
    # The checkpoint order of the axis (or the one checkpoint) is the load order.
    order = list(dict.fromkeys(c.checkpoint for c in cells))
    check_cells(cells)  # every LoRA fits its checkpoint (headers only), before anything renders
    return Plan(axes=axes, cells=cells, checkpoints=order, geometry=geo, resolved_seeds=drawn)


def effective_schedule_label(cell: Cell) -> str:
    """A1111's "Schedule type" of a cell: Automatic resolved to the sampler's default."""
    sampler, _ = split_sampler(cell.sampler)
    return effective_schedule(sampler, resolve_schedule(cell.scheduler)).label
