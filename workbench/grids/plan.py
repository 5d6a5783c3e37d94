"""The plan of a grid, made before any model is loaded: its axes, every cell, and what it will cost.

Cells are numbered in reading order (sub-grid, then row, then column), which is also the order of
`cells/NNNN.png`. Rendering goes in a different order, `Plan.render_order`: checkpoint outermost,
so each model is loaded once, then cells that share steps, CFG and sampler, so they can batch.
Seed -1 is resolved here, once, so every cell of that seed gets the same noise and the plan
records the seed actually used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.grids import layout
from workbench.grids.axes import FLAGS, KINDS, Axis, checkpoint_names, label_for
from workbench.grids.lora_apply import cell_loras, check_cells, lora_plan, with_axis_lora
from workbench.grids.samplers import resolve

POSITIONS = ("x", "y", "z")
MAX_MEGAPIXELS = 200.0  # A1111 refuses larger grids; so do we, unless --force


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
    loras: list[str] = field(default_factory=list)  # LoRA files or "none" (an axis kind: lora)
    lora_weights: list[float] = field(default_factory=lambda: [1.0])  # their strength (lora_weight)
    lora_dirs: list[Path] = field(default_factory=list)  # where <lora:NAME> tags are looked up

    def values(self, kind: str) -> list:
        return {
            "lora": self.loras,
            "lora_weight": self.lora_weights,
            "checkpoint": self.checkpoints,
            "prompt": self.prompts,
            "seed": self.seeds,
            "sr": self.sr,
            "cfg": self.cfgs,
            "steps": self.steps,
            "sampler": self.samplers,
        }[kind]


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
    loras: tuple[tuple[str, float, float], ...] = ()  # (file, te, unet) from the prompt's <lora:> tags

    @property
    def file(self) -> str:
        return f"cells/{self.index:04d}.png"

    def batch_key(self) -> tuple:
        """Cells with the same key can be sampled in one pipeline call."""
        return (self.steps, self.cfg, self.sampler, self.width, self.height, self.loras)


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
        """Checkpoint outermost (one load each), then LoRA sets (applied in place: cheap), then
        batchable cells together, then file order."""
        ckpt_rank = {p: i for i, p in enumerate(self.checkpoints)}
        return sorted(self.cells, key=lambda c: (ckpt_rank[c.checkpoint], c.loras, c.batch_key(), c.index))

    def shape(self) -> tuple[int, int, int]:
        return tuple(len(self.axes[p]) if self.axes[p] else 1 for p in POSITIONS)  # type: ignore[return-value]


def assign_axes(request: GridRequest) -> dict[str, str | None]:
    """Which kind goes on x, y and z: the explicit --x/--y/--z first, then every other kind with
    several values, in the preferred order (checkpoint, prompt, seed, sr, cfg, steps, sampler)."""
    placed: dict[str, str | None] = {p: None for p in POSITIONS}
    for position, kind in request.axes.items():
        if position not in POSITIONS:
            raise WorkbenchError(f"--{position}: no such axis; use --x, --y or --z")
        if kind not in KINDS:
            raise WorkbenchError(f"--{position} {kind!r}: unknown axis kind; known: {', '.join(KINDS)}")
        if kind in placed.values():
            raise WorkbenchError(f"--{position} {kind}: {kind} is already on another axis")
        placed[position] = kind
    if "sr" in placed.values() and not request.sr:
        raise WorkbenchError('--sr: an sr axis needs --sr "search,replacement,..."')
    varying = [k for k in KINDS if len(request.values(k)) > 1 and k not in placed.values()]
    for position in POSITIONS:
        if placed[position] is None and varying:
            placed[position] = varying.pop(0)
    if varying:
        flags = " and ".join(FLAGS[k] for k in varying)
        raise WorkbenchError(
            f"{flags}: several values but no free axis (x, y and z are taken); give a single value "
            "or put it on an axis with --x/--y/--z"
        )
    return placed


def resolve_seeds(seeds: list[int], rng: random.Random | None = None) -> tuple[list[int], dict[int, int]]:
    """Replace each -1 by a random seed, once. Returns the seeds and {position: drawn seed}."""
    rng = rng or random.SystemRandom()
    out, drawn = [], {}
    for i, seed in enumerate(seeds):
        if seed == -1:
            seed = drawn[i] = rng.randrange(2**32)
        elif not 0 <= seed < 2**64:
            raise WorkbenchError(f"--seeds {seed}: a seed is -1 (random) or between 0 and 2^64 - 1")
        out.append(seed)
    return out, drawn


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
    for steps in request.steps:
        if steps < 1:
            raise WorkbenchError(f"--steps {steps}: must be at least 1")
    for cfg in request.cfgs:
        if cfg < 0:
            raise WorkbenchError(f"--cfg {cfg:g}: must not be negative")
    for side, flag in ((request.width, "width"), (request.height, "height")):
        if side < 8 or side % 8:
            raise WorkbenchError(
                f"--size {request.width}x{request.height}: the {flag} must be a multiple of 8"
            )
    if request.sr:
        if len(request.sr) < 2:
            raise WorkbenchError(f"--sr {request.sr[0]!r}: give the search text and at least one replacement")
        search = request.sr[0]
        if not any(search in p for p in request.prompts) and search not in request.negative:
            raise WorkbenchError(f"--sr: {search!r} is in none of the prompts")
    for name in request.samplers:
        resolve(name)


def _apply_sr(text: str, search: str | None, value: str | None) -> str:
    # The first S/R value is the search text itself, so its cells keep the original prompt.
    return text if search is None or value is None else text.replace(search, value)


def make_plan(
    request: GridRequest,
    force: bool = False,
    max_megapixels: float = MAX_MEGAPIXELS,
    rng: random.Random | None = None,
) -> Plan:
    """Check the request, place the axes, list the cells and refuse a grid over `max_megapixels`."""
    _check_request(request)
    placed = assign_axes(request)
    seeds, drawn = resolve_seeds(request.seeds, rng)
    lora_names, lookup = lora_plan(request)
    names = dict(zip(request.checkpoints, checkpoint_names(request.checkpoints), strict=True))
    samplers = [resolve(s).key for s in request.samplers]
    values = {
        "checkpoint": request.checkpoints,
        "prompt": request.prompts,
        "seed": seeds,
        "sr": request.sr or [None],
        "cfg": [float(c) for c in request.cfgs],
        "steps": request.steps,
        "sampler": samplers,
        "lora": lora_names,
        "lora_weight": [float(w) for w in request.lora_weights],
    }

    def axis(kind: str) -> Axis:
        vals = values[kind]
        if kind == "checkpoint":
            labels = [names[p] for p in vals]
        elif kind == "sampler":
            labels = [resolve(s).display for s in vals]
        elif kind == "lora":
            labels = [v or "none" for v in vals]
        else:
            labels = [label_for(kind, v) for v in vals]
        return Axis(kind, list(vals), labels)

    axes = {p: axis(k) if k else None for p, k in placed.items()}
    kind_at = {k: p for p, k in placed.items() if k}
    cols, rows, subgrids = (len(axes[p]) if axes[p] else 1 for p in POSITIONS)
    geo = layout.geometry(
        cols, rows, subgrids, request.width, request.height,
        row_labels=axes["y"] is not None, col_labels=axes["x"] is not None, titles=axes["z"] is not None,
    )  # fmt: skip
    if geo.width * geo.height / 1e6 > max_megapixels and not force:
        raise WorkbenchError(
            f"the grid would be {geo.width}x{geo.height} = {geo.width * geo.height / 1e6:.0f} megapixels, "
            f"over the {max_megapixels:.0f} MP limit; use fewer values or a smaller --size, or --force"
        )

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
                prompt = with_axis_lora(_apply_sr(pick("prompt"), search, replacement), pick("lora"),
                                        pick("lora_weight"))  # fmt: skip
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
                        sampler=pick("sampler"),
                        width=request.width,
                        height=request.height,
                        loras=cell_loras(prompt, lookup),
                    )  # fmt: skip
                )
    # The checkpoint order of the axis (or the one checkpoint) is the load order.
    order = list(dict.fromkeys(c.checkpoint for c in cells))
    check_cells(cells)  # every LoRA fits its checkpoint (headers only), before anything renders
    return Plan(axes=axes, cells=cells, checkpoints=order, geometry=geo, resolved_seeds=drawn)
