"""`wb lora ...`: bake, extract, resize and merge LoRA files. Each command calls one library
function and prints a summary; `wb inspect` on a LoRA file prints `print_lora_description`."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workbench.console import err, friendly, human_bytes, metadata_table, out
from workbench.errors import WorkbenchError

lora_app = typer.Typer(
    help="LoRA files: bake into a checkpoint, extract from a fine-tune, resize, merge. Files are written "
    "in kohya's format (what A1111, ComfyUI, Forge and kohya read); kohya, diffusers/PEFT and LyCORIS "
    "files are read. `wb inspect LORA` describes one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SAVE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


def _command(name: str, argv_tail: list[str]) -> str:
    return shlex.join(["wb", "lora", name, *argv_tail])


def _argv_tail() -> list[str]:
    args = sys.argv[1:]
    return args[2:] if len(args) >= 2 and args[0] == "lora" else args


def _save_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    if dtype not in SAVE_DTYPES:
        raise WorkbenchError(f"--dtype {dtype}: one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[dtype]


@contextmanager
def _progress(label: str, task_name: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields the (done, total) callback the library calls."""
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(task_name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@lora_app.command("bake")
@friendly
def bake_command(
    base: Path = typer.Argument(
        ..., help="The checkpoint to bake into (.safetensors, .ckpt, diffusers folder)."
    ),
    loras: list[str] = typer.Argument(
        ...,
        metavar="LORA[:STRENGTH] ...",
        help="LoRA files, each with an optional strength (default 1.0), or LORA:TE:UNET as in A1111's "
        "<lora:name:te:unet>.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The .safetensors to write (never an input)."),
    te_strength: float = typer.Option(
        1.0, "--te-strength", help="Multiplies every LoRA's text encoder strength (0: leave the TE alone)."
    ),
    unet_strength: float = typer.Option(
        1.0, "--unet-strength", help="Multiplies every LoRA's UNet strength."
    ),
    dtype: str = typer.Option("fp16", "--dtype", help="Output dtype: fp16, bf16 or fp32 (math is float32)."),
    threads: int = typer.Option(
        3, "--threads", min=1, help="Threads: N - 1 compute keys (the LoRA products) while one writes."
    ),
) -> None:
    """Bake LoRAs into a checkpoint: W' = W + m * (alpha/rank) * up @ down per module, in float32,
    streamed key by key through the merge engine. The recipe is recorded: `wb merge replay` re-runs it."""
    from workbench.lora.ops import bake, parse_lora_spec

    specs = [parse_lora_spec(x) for x in loras]
    command = _command("bake", _argv_tail())
    with _progress("baking", "bake") as progress:
        result = bake(
            base,
            specs,
            output,
            te_strength,
            unet_strength,
            dtype,
            threads,
            progress,
            command,
        )
    out.print(
        f"wrote [bold]{result.path}[/] ({human_bytes(result.bytes)}, {dtype}) in {result.seconds:.1f} s: "
        f"{result.keys_changed} weights changed",
        highlight=False,
    )
    for name, n in result.modules.items():
        lost, touched = result.lost.get(name, (0, 0))
        note = ""
        if touched:
            note = f"; {lost:,} of {touched:,} changed entries are below what {dtype} can hold (unchanged)"
        out.print(f"  {name}: {n} modules{note}", highlight=False)


@lora_app.command("extract")
@friendly
def extract_command(
    tuned: Path = typer.Argument(..., help="The fine-tuned checkpoint."),
    base: Path = typer.Argument(..., help="The checkpoint it was tuned from."),
    rank: int = typer.Option(..., "--rank", "-r", help="Rank of every linear / 1x1 module."),
    conv_rank: int | None = typer.Option(
        None,
        "--conv-rank",
        help="Rank of the ResNet and sampler convs' 3x3 kernels (a LoCon; default: the --rank, as "
        "LyCORIS' extract_locon takes every conv). --conv-rank 0: leave them out (kohya's default set).",
    ),
    components: str = typer.Option("unet,te", "--components", help="unet, te or unet,te."),
    alpha: float | None = typer.Option(
        None, "--alpha", help="alpha of linear modules (default: the rank, scale 1)."
    ),
    svd: str = typer.Option(
        "auto",
        "--svd",
        help="exact (torch.linalg.svd), randomized (torch.svd_lowrank, 4 power iterations) or auto: "
        "randomized where both sides of a module are at least 2 * (rank + 10), else exact.",
    ),
    clamp: float | None = typer.Option(
        None,
        "--clamp-quantile",
        help="kohya's clamp of up/down at this quantile (e.g. 0.99); off by default.",
    ),
    min_diff: float = typer.Option(
        0.0, "--min-diff", help="Leave the text encoder out when no entry differs by more (kohya: 0.01)."
    ),
    dtype: str = typer.Option("fp16", "--dtype", help="Save dtype: fp16, bf16 or fp32."),
    lora_only: bool = typer.Option(
        False,
        "--lora-only",
        "--no-extras",
        help="Write only lora_up/lora_down/alpha (a pure kohya LoRA, which diffusers also loads): no "
        "diff_b / w_norm / b_norm / diff keys for biases, norms, conv_in/conv_out and time embedding.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The LoRA .safetensors to write."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per module."),
) -> None:
    """Extract a LoRA from a fine-tune: per module the best rank-R approximation of (tuned - base) by SVD,
    plus (unless --lora-only) the exact changes of biases, norms, conv_in/conv_out and the time embedding
    in the keys A1111 and ComfyUI read (diff_b, w_norm/b_norm, diff)."""
    _check_headers(tuned, base)
    from workbench.lora.extract import extract

    comps = [c.strip() for c in components.split(",") if c.strip()]
    if conv_rank is None:
        conv_rank = rank  # a full fine-tune moves the ResNet convs most: leaving them out loses its look
    with _progress("extracting", "extract") as progress:
        res = extract(
            tuned,
            base,
            output,
            rank,
            conv_rank or None,
            comps,
            alpha,
            None,
            svd,
            clamp,
            min_diff,
            _save_dtype(dtype),
            progress,
            _command("extract", _argv_tail()),
            extras=not lora_only,
        )
    if verbose:
        table = Table(title="modules", title_justify="left")
        for col in ("module", "rank", "|diff|", "kept"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for m in res.modules:
            table.add_row(m.name, str(m.rank), f"{m.norm:.4g}", f"{m.kept:.2%}")
        out.print(table)
    worst = min(res.modules, key=lambda m: m.kept) if res.modules else None
    least = f" (least: {worst.kept:.2%} in {worst.name})" if worst else ""
    out.print(
        f"wrote [bold]{res.path}[/] ({res.family}, {len(res.modules)} modules, "
        f"{human_bytes(res.path.stat().st_size)}) "
        f"in {res.seconds:.1f} s: the rank keeps {res.kept:.2%} of the difference's Frobenius norm{least}",
        highlight=False,
    )
    if res.extras:
        parts = {"norm": "norm modules (w_norm, b_norm)", "full": "full modules (diff, diff_b)",
                 "diff_b": "bias changes (diff_b)"}  # fmt: skip
        listed = ", ".join(f"{n} {parts[k]}" for k, n in res.extras.items())
        out.print(
            f"+ extras, exact: {listed}, {human_bytes(res.extra_bytes)}: A1111 and ComfyUI apply them; "
            "[yellow]diffusers' load_lora_weights refuses such a file[/] (--lora-only writes none)",
            highlight=False,
        )
    if res.file_share < 0.9995:
        lost = {**res.left_out, "the rank's truncation": 1 - res.file_share - sum(res.left_out.values())}
        gone = ", ".join(
            f"{k} {v:.1%}" if v >= 0.001 else f"{k} <0.1%"
            for k, v in sorted(lost.items(), key=lambda kv: -kv[1])
            if v > 0
        )
        out.print(
            f"the file holds {res.file_share:.1%} of the whole difference's energy (squared Frobenius "
            f"norm); not in it: {gone}",
            highlight=False,
        )
    if res.conv_share is not None and res.conv_share > 0.05:
        out.print(
            f"[yellow]{res.conv_share:.0%} of the difference is in ResNet/sampler convs, not extracted[/]: "
            "give --conv-rank R (not 0) to take them too (a LoCon, as kohya's conv_dim)",
            highlight=False,
        )
    if res.te_dropped:
        out.print(f"text encoder left out: no entry differs by more than {min_diff:g}", highlight=False)
    if res.skipped_zero:
        out.print(f"{res.skipped_zero} modules with no difference were not written", highlight=False)
    if res.zeroed:
        out.print(f"[yellow]{res.zeroed:,} entries became 0 in {dtype}[/] (use --dtype fp32 to keep them)")


@lora_app.command("resize")
@friendly
def resize_command(
    lora: Path = typer.Argument(..., help="A LoRA file (kohya or diffusers/PEFT)."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="New rank (a module's rank never grows)."),
    fro: float | None = typer.Option(
        None, "--fro", help="Per module, the smallest rank keeping this share of the Frobenius norm (0.9)."
    ),
    plus_one: bool = typer.Option(
        False,
        "--kohya-plus-one",
        help="With --fro keep one more singular value, as kohya's resize_lora does.",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="Save dtype (default: the input's)."),
    output: Path = typer.Option(..., "-o", "--output", help="The LoRA .safetensors to write."),
) -> None:
    """Shrink a LoRA's rank by SVD, keeping each module's effective scale alpha/rank."""
    _check_headers(lora, lora_file=True)
    from workbench.lora.combine import resize

    with _progress("resizing", "resize") as progress:
        res = resize(
            lora,
            output,
            rank,
            fro,
            plus_one,
            _save_dtype(dtype),
            progress,
            _command("resize", _argv_tail()),
        )
    _print_combine(res)


@lora_app.command("merge")
@friendly
def merge_command(
    loras: list[str] = typer.Argument(..., metavar="LORA:STRENGTH ...", help="LoRA files with strengths."),
    rank: int | None = typer.Option(
        None, "--rank", "-r", help="SVD to this rank (default: exact concatenation)."
    ),
    conv_rank: int | None = typer.Option(
        None, "--conv-rank", help="Rank of 3x3 conv modules (default: --rank)."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="A checkpoint of the LoRAs' model: matches module names across spellings."
    ),
    dtype: str = typer.Option("fp16", "--dtype", help="Save dtype: fp16, bf16 or fp32."),
    output: Path = typer.Option(..., "-o", "--output", help="The LoRA .safetensors to write."),
) -> None:
    """Combine LoRAs into one: sum of m_i * (alpha_i/r_i) * up_i @ down_i, exactly (rank grows) or by SVD."""
    from workbench.lora.ops import parse_lora_spec

    specs = []
    for text in loras:
        spec = parse_lora_spec(text)
        if spec.te is not None:
            raise WorkbenchError(f"{text!r}: one strength per LoRA in a merge (LORA:STRENGTH)")
        specs.append((spec.path, spec.strength))
    _check_headers(*(path for path, _ in specs), lora_file=True)
    from workbench.lora.combine import merge_loras
    with _progress("merging", "merge") as progress:
        res = merge_loras(
            specs,
            output,
            rank,
            conv_rank,
            base,
            _save_dtype(dtype),
            progress,
            _command("merge", _argv_tail()),
        )
    _print_combine(res)


def _print_combine(res) -> None:
    ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(res.ranks.items()))
    worst = f" (least: {res.worst[1]:.2%} in {res.worst[0]})" if res.worst and res.kept < 1 else ""
    out.print(
        f"wrote [bold]{res.path}[/] ({res.modules} modules; {ranks}; "
        f"{human_bytes(res.path.stat().st_size)}): "
        f"keeps {res.kept:.2%} of the Frobenius norm{worst}",
        highlight=False,
    )
    if res.zeroed:
        out.print(f"[yellow]{res.zeroed:,} entries became 0 in the save dtype[/]")


# ---------------------------------------------------------------------------------------------------
# wb inspect on a LoRA


def print_lora_description(d, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"type": "lora", **d.to_json()}, indent=2) + "\n")
        return
    fam = d.family or "unknown family"
    told = f" (from its {d.family_from})" if d.family else ""
    out.print(
        f"[bold]{d.path}[/]  [cyan]{d.kind}[/] for [cyan]{fam}[/]{told}, {d.format} format, "
        f"{d.modules} modules ({d.conv_modules} conv), {d.params:,} parameters, {human_bytes(d.size_bytes)}",
        highlight=False,
    )
    if d.metadata_family and d.family and d.metadata_family != d.family:
        out.print(f"[yellow]its metadata says {d.metadata_family}[/]")
    if d.sha256:
        out.print(f"  sha256 {d.sha256}  AutoV2 [bold]{d.autov2}[/]", highlight=False)
        ok = ""
        if d.sshs_recorded:
            same = d.sshs_recorded == d.sshs_model_hash
            ok = (
                " (matches the metadata)"
                if same
                else f" [yellow](metadata says {d.sshs_recorded[:12]}...)[/]"
            )
        out.print(f"  sshs_model_hash {d.sshs_model_hash}{ok}", highlight=False)
    table = Table(title="modules", title_justify="left")
    for col in ("family", "modules", "params", "rank", "alpha", "alpha/rank"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for name, g in d.groups.items():
        table.add_row(
            name, str(g.modules), f"{g.params:,}", _counts(g.ranks), _counts(g.alphas), _counts(g.scales)
        )
    out.print(table)
    if d.extras:
        parts = {"diff_b": "bias changes of LoRA modules (diff_b)", "norm": "norm modules (w_norm/b_norm)",
                 "full": "full modules (diff/diff_b)"}  # fmt: skip
        listed = ", ".join(f"{n} {parts[k]}" for k, n in d.extras.items())
        out.print(f"extras (whole changes, no rank): {listed}, {d.extra_params:,} params", highlight=False)
    dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(d.dtypes.items()))
    out.print(f"dtypes: {dtypes}", highlight=False)
    if d.training:
        out.print(metadata_table("training (kohya ss_* metadata)", d.training.items()))
    if d.tags:
        tags = ", ".join(f"{t} ({n})" for t, n in d.tags)
        out.print(f"dataset tags ({d.tag_count} distinct), most frequent: {tags}", highlight=False)
    shown = {k: v for k, v in d.metadata.items() if not k.startswith("ss_") and k != "sshs_model_hash"}
    if shown:
        out.print(metadata_table("other metadata", sorted(shown.items()), " ... (--json shows all)"))


def _counts(d: dict[str, int]) -> str:
    if len(d) == 1:
        return next(iter(d))
    return ", ".join(f"{k} ({n})" for k, n in sorted(d.items(), key=lambda kv: -kv[1]))


def baked_loras(metadata: dict[str, str]) -> list[dict]:
    """The LoRAs a merged file had baked in, from its recorded recipe: name, file, sha256, strengths."""
    raw = metadata.get("wb.merge_recipe")
    if not raw:
        return []
    try:
        recipe = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(recipe, dict):
        return []
    inputs = {i.get("name"): i for i in recipe.get("inputs", []) if isinstance(i, dict)}
    rows = []
    for step in recipe.get("steps", []):
        if not isinstance(step, dict) or step.get("method") != "lora" or len(step.get("inputs", [])) < 2:
            continue
        inp = inputs.get(step["inputs"][1], {})
        comps = step.get("components") or {}
        strength = (step.get("params") or {}).get("strength")
        rows.append(
            {
                "step": step.get("name"),
                "into": step["inputs"][0],
                "lora": Path(str(inp.get("path", ""))).name,
                "sha256": inp.get("sha256"),
                "strength": strength,
                "te": comps.get("text_encoder", strength),
                "unet": comps.get("unet", strength),
            }
        )
    return rows


def print_baked(metadata: dict[str, str]) -> None:
    rows = baked_loras(metadata)
    if not rows:
        return
    table = Table(title="LoRAs baked in", title_justify="left")
    for col in ("step", "into", "LoRA", "sha256", "TE", "UNet"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["step"], r["into"], r["lora"], (r["sha256"] or "")[:10], f"{r['te']:g}", f"{r['unet']:g}"
        )
    out.print(table)


def _check_headers(*paths, lora_file: bool = False) -> None:
    """Refuse a bad input from its header before the command imports torch (2 s): a broken file,
    a fifo or a LoRA with an unknown layout is one line at once, not after the wait."""
    from workbench.checkpoint.lora_format import open_lora
    from workbench.checkpoint.reader import open_checkpoint

    for path in paths:
        (open_lora if lora_file else open_checkpoint)(path).close()
