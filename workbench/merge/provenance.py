"""What a merged file says about how it was made, and its ancestry as a tree.

Every output carries:
- A1111's `sd_merge_recipe` (the last step, in A1111's field names plus wb's own) and
  `sd_merge_models` (every parent by sha256 with its own recipe; the parents' `sd_merge_models` are
  folded in, so the ancestry survives chains of merges made by wb, A1111 or anything compatible);
- `format: pt` and the `modelspec.*` keys ComfyUI and others read;
- `wb.merge_recipe`: wb's complete recipe (inputs with path, sha256 and size; steps; output dtype)
  from which `wb merge replay` re-runs the merge bit-identically.

Intermediate steps of a recipe are never written; they appear in `sd_merge_models` under a
`wb-step:NAME@HASH` reference (HASH: of the step's recipe and its inputs' references) instead of a
file's sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.merge.blocks import BLOCK_CONVENTION
from workbench.merge.methods import get_method
from workbench.merge.recipe import Recipe, Step

if TYPE_CHECKING:
    from rich.tree import Tree

    from workbench.merge.plan import MergePlan

# A1111's names for the methods it has; the others go by wb's name.
A1111_METHOD_NAMES = {"weighted": "Weighted sum", "add-diff": "Add difference"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}
# Keys of A's metadata that describe the model itself (not how A was made) and stay true of the merge.
INHERITED = ("wb.architecture", "wb.diffusers_configs", "modelspec.prediction_type", "modelspec.resolution")
STEP_REF = "wb-step:"


def legacy_hash(path: str | Path) -> str:
    """A1111's old 8-character model hash (64 KiB at 1 MiB); it collides on merges, so only shown."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def parse_json_field(metadata: Mapping[str, Any], name: str) -> Any:
    value = metadata.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _version() -> str:
    try:
        from workbench import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - the package always defines it
        return "unknown"


def recorded_recipe(plan: MergePlan) -> Recipe:
    """The plan's recipe with every input's resolved absolute path, sha256 and size filled in."""
    inputs = []
    for inp in plan.recipe.inputs:
        src = plan.sources[inp.name]
        inputs.append(replace(inp, path=str(src.path.resolve()), sha256=src.sha256, size=src.size))
    return replace(plan.recipe, inputs=inputs)


def merge_metadata(plan: MergePlan, out_path: Path, command: str | None = None) -> dict[str, str]:
    recipe = recorded_recipe(plan)
    refs = _references(recipe)
    models: dict[str, Any] = {}
    for src in plan.sources.values():  # the parents' own ancestry first, so direct entries win
        parent_models = parse_json_field(src.ckpt.metadata, "sd_merge_models")
        if isinstance(parent_models, Mapping):
            models.update(parent_models)
    for src in plan.sources.values():
        if src.sha256 is None:
            continue
        models[src.sha256] = {
            "name": src.path.name,
            "legacy_hash": legacy_hash(src.path) if src.path.is_file() else None,
            "sd_merge_recipe": parse_json_field(src.ckpt.metadata, "sd_merge_recipe"),
        }
    for step in recipe.steps:
        if step.name != recipe.output:
            models[refs[step.name]] = {
                "name": step.name,
                "legacy_hash": None,
                "sd_merge_recipe": _a1111_recipe(step, refs, plan, out_path),
            }

    a_meta = plan.sources[plan.base].ckpt.metadata
    full = recipe.to_dict()
    full.update({"wb_version": _version(), "block_names": plan.blocks, "block_convention": BLOCK_CONVENTION})
    meta = {k: a_meta[k] for k in INHERITED if k in a_meta}
    meta.update(
        {
            "format": "pt",
            "sd_merge_recipe": json.dumps(_a1111_recipe(recipe.output_step, refs, plan, out_path)),
            "sd_merge_models": json.dumps(models),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": _modelspec_architecture(plan, a_meta),
            "modelspec.title": out_path.stem,
            "wb.merge_recipe": json.dumps(full, sort_keys=True),
            "wb.version": _version(),
        }
    )
    if command:
        meta["wb.made_by"] = command
    return meta


def _modelspec_architecture(plan: MergePlan, a_meta: Mapping[str, str]) -> str:
    if plan.architecture == "toy" and a_meta.get("modelspec.architecture"):
        return a_meta["modelspec.architecture"]
    if plan.architecture == "toy":
        return f"wb-toy/{plan.layout}-layout"
    if plan.layout == "sd2" and "v-prediction" in plan.variants:
        return "stable-diffusion-v2-768-v"
    return MODELSPEC_ARCHITECTURE.get(plan.layout, plan.layout)


def _references(recipe: Recipe) -> dict[str, str | None]:
    """Each node's reference in sd_merge_models: an input's sha256, or a step's content hash."""
    refs: dict[str, str | None] = {i.name: i.sha256 for i in recipe.inputs}
    for step in recipe.steps:
        body = json.dumps(
            {
                "method": step.method,
                "params": step.params,
                "components": step.components,
                "blocks": step.blocks,
                "inputs": [refs[r] for r in step.inputs],
            },
            sort_keys=True,
        )
        refs[step.name] = f"{STEP_REF}{step.name}@{hashlib.sha256(body.encode()).hexdigest()[:10]}"
    return refs


def _a1111_recipe(step: Step, refs: Mapping[str, str | None], plan: MergePlan, out_path: Path) -> dict:
    method = get_method(step.method)
    parents = [refs[r] for r in step.inputs]
    names = [plan.sources[r].path.name if r in plan.sources else r for r in step.inputs]
    padded = parents + [None] * (3 - len(parents))
    return {
        "type": "wb-merge",
        "primary_model_hash": padded[0],
        "secondary_model_hash": padded[1],
        "tertiary_model_hash": padded[2],
        "interp_method": A1111_METHOD_NAMES.get(method.name, method.name),
        "multiplier": step.params[method.weight_param],
        "save_as_half": plan.recipe.dtype == "fp16",
        "custom_name": out_path.stem if step.name == plan.recipe.output else step.name,
        "config_source": 0,  # A1111's "Copy config from: A, B or C" (its radio button's index)
        "bake_in_vae": "None",
        "discard_weights": plan.recipe.discard or "",
        "is_inpainting": "inpaint" in plan.variants,
        "is_instruct_pix2pix": "instruct-pix2pix" in plan.variants,
        "wb_method": method.name,
        "wb_formula": method.formula,
        "wb_params": step.params,
        "wb_components": step.components,
        "wb_blocks": step.blocks,
        "wb_models": parents,
        "wb_model_names": names,
        "wb_roles": method.input_roles(len(step.inputs)),
        "wb_dtype": plan.recipe.dtype,
        "wb_vae_from": plan.recipe.vae_from,
    }


# ---------------------------------------------------------------------------------------------------
# ancestry


def ancestry_tree(metadata: Mapping[str, Any], max_depth: int = 32) -> dict | None:
    """The ancestry recorded in a file's metadata as nested dicts, or None when it is not a merge.

    Each node: {"name", "sha256", "role", "recipe" (the sd_merge_recipe, or None for a model that
    was not merged), "parents": [nodes]}. Works on wb's and A1111's metadata alike."""
    recipe = parse_json_field(metadata, "sd_merge_recipe")
    if not isinstance(recipe, Mapping):
        return None
    models = parse_json_field(metadata, "sd_merge_models")
    models = models if isinstance(models, Mapping) else {}
    title = metadata.get("modelspec.title") or recipe.get("custom_name") or "this model"
    return {
        "name": title,
        "sha256": None,
        "role": None,
        "recipe": dict(recipe),
        "parents": _parents(recipe, models, set(), max_depth),
    }


def _parents(recipe: Mapping, models: Mapping, seen: set[str], depth: int) -> list[dict]:
    if depth <= 0:
        return []
    refs = recipe.get("wb_models")
    if not isinstance(refs, list):
        refs = [recipe.get(f"{p}_model_hash") for p in ("primary", "secondary", "tertiary")]
        refs = [r for r in refs if r]
    roles = recipe.get("wb_roles") or ["A", "B", "C"][: len(refs)]
    names = recipe.get("wb_model_names") or []
    nodes = []
    for i, ref in enumerate(refs):
        entry = models.get(ref) if isinstance(ref, str) else None
        entry = entry if isinstance(entry, Mapping) else {}
        parent_recipe = entry.get("sd_merge_recipe")
        if isinstance(parent_recipe, str):
            try:
                parent_recipe = json.loads(parent_recipe)
            except ValueError:
                parent_recipe = None
        is_step = isinstance(ref, str) and ref.startswith(STEP_REF)
        node = {
            "name": entry.get("name") or (names[i] if i < len(names) else None) or "unknown model",
            "sha256": None if is_step else ref,
            "role": roles[i] if i < len(roles) else None,
            "recipe": dict(parent_recipe) if isinstance(parent_recipe, Mapping) else None,
            "parents": [],
        }
        if node["recipe"] is not None and ref not in seen:
            node["parents"] = _parents(node["recipe"], models, seen | {ref}, depth - 1)
        nodes.append(node)
    return nodes


def describe_recipe(recipe: Mapping) -> str:
    method = recipe.get("interp_method") or recipe.get("wb_method") or "merge"
    params = recipe.get("wb_params")
    if isinstance(params, Mapping) and params:
        shown = ", ".join(
            f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in params.items()
        )
    else:
        shown = f"multiplier {recipe.get('multiplier')}"
    extra = []
    if recipe.get("wb_components"):
        extra.append(", ".join(f"{k} {v:g}" for k, v in recipe["wb_components"].items()))
    if recipe.get("wb_blocks"):
        extra.append("block weights")
    return f"{method} ({shown}{'; ' + '; '.join(extra) if extra else ''})"


def render_ancestry(metadata: Mapping[str, Any]) -> Tree | None:
    """A rich Tree of the ancestry for `wb inspect` (None when the file is not a merge)."""
    from rich.markup import escape
    from rich.tree import Tree

    root = ancestry_tree(metadata)
    if root is None:
        return None

    def label(node: dict) -> str:
        role = f"[bold]{escape(node['role'])}[/] " if node["role"] else ""
        sha = f" [dim]{node['sha256'][:10]}[/]" if node["sha256"] else ""
        how = f"  [cyan]{escape(describe_recipe(node['recipe']))}[/]" if node["recipe"] else ""
        return f"{role}{escape(str(node['name']))}{sha}{how}"

    def add(tree: Tree, nodes: list[dict]) -> None:
        for node in nodes:
            add(tree.add(label(node)), node["parents"])

    tree = Tree(label(root))
    add(tree, root["parents"])
    return tree
