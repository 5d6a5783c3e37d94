"""wb merge: streaming checkpoint merges with recipes, block weights and provenance.

methods.py (formulas), blocks.py (block-weight names), recipe.py (the merge graph), plan.py (what
happens to each key, from the headers), engine.py (stream key by key), provenance.py (metadata and
ancestry), replay.py, cli.py (Typer).

Nothing is imported eagerly: `wb --help` must not pay for torch. The names below load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MergePlan": "plan",
    "MergeResult": "plan",
    "execute": "engine",
    "merge": "engine",
    "plan_merge": "plan",
    "ancestry_tree": "provenance",
    "render_ancestry": "provenance",
    "Recipe": "recipe",
    "load_yaml": "recipe",
    "single_step": "recipe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"workbench.merge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'workbench.merge' has no attribute {name!r}")
