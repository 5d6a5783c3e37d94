"""Block-weight ("MBW") names: which block of the UNet a key belongs to.

SD 1.x/2.x have 26 blocks: BASE, IN00..IN11, M00, OUT00..OUT11; SDXL has 20: BASE, IN00..IN08, M00,
OUT00..OUT08. `input_blocks.N` -> INnn, `middle_block` -> M00, `output_blocks.N` -> OUTnn, the final
`out.` layers -> the last OUT block, and everything outside the UNet -> BASE.

Tools disagree on `time_embed` (IN00 in some MBW forks, BASE in supermerger). wb puts it, and SDXL's
`label_emb`, under BASE: they condition every block rather than belonging to the first one. The
convention is recorded in the metadata of every merge (`BLOCK_CONVENTION`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from workbench.errors import WorkbenchError

UNET = "model.diffusion_model."
# Number of input (and output) blocks in each key layout's real UNet.
INPUT_BLOCKS = {"sd1": 12, "sd2": 12, "sdxl": 9, "sdxl-refiner": 12}
BLOCK_CONVENTION = "time_embed and label_emb -> BASE; out. -> last OUT block; non-UNet keys -> BASE"

_INDEXED = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")


def block_names(n_input_blocks: int) -> list[str]:
    return (
        ["BASE"]
        + [f"IN{i:02d}" for i in range(n_input_blocks)]
        + ["M00"]
        + [f"OUT{i:02d}" for i in range(n_input_blocks)]
    )


def count_input_blocks(keys: Iterable[str]) -> int:
    """How many input blocks a model's UNet really has (a toy model has fewer than the real one)."""
    highest = -1
    for key in keys:
        if key.startswith(UNET):
            m = _INDEXED.match(key, len(UNET))
            if m and m.group(1) == "input_blocks":
                highest = max(highest, int(m.group(2)))
    return highest + 1


def block_of(key: str, n_input_blocks: int) -> str:
    if not key.startswith(UNET):
        return "BASE"
    m = _INDEXED.match(key, len(UNET))
    if m:
        prefix = "IN" if m.group(1) == "input_blocks" else "OUT"
        return f"{prefix}{int(m.group(2)):02d}"
    rest = key[len(UNET) :]
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith("out."):
        return f"OUT{n_input_blocks - 1:02d}"
    return "BASE"  # time_embed, label_emb


def parse_blocks(
    text: str | Iterable[float], counts: Iterable[int] | None, where: str = "--blocks"
) -> list[float]:
    """Block weights from '0.5,0.5,...' or a list; refused unless there is one per block name of a
    model with one of `counts` input blocks (not checked when None: the model is not known yet)."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            bad = next(p for p in parts if not _is_float(p))
            raise WorkbenchError(f"{where}: {bad!r} is not a number") from None
    else:
        values = []
        for v in text:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise WorkbenchError(f"{where}: {v!r} is not a number")
            values.append(float(v))
    if counts is None:
        return values
    allowed = sorted(set(counts))
    if len(values) not in [2 * n + 2 for n in allowed]:
        need = " or ".join(f"{2 * n + 2} ({_describe(n)})" for n in allowed)
        raise WorkbenchError(f"{where}: {len(values)} values given, this model needs {need}")
    return values


def _describe(n: int) -> str:
    return f"BASE, IN00..IN{n - 1:02d}, M00, OUT00..OUT{n - 1:02d}"


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
