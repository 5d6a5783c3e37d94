"""A merge recipe: named inputs (paths), named steps (method, inputs by name, parameters), one output.

The same structure comes from CLI flags (one step), from a YAML file (`wb merge run`) and from the
JSON that every merged file carries (`wb merge replay`). Steps may only refer to inputs and earlier
steps, so the graph has no cycles and evaluates in file order, key by key, with nothing written
between steps.

Per-component weights and block weights override the method's weight parameter (`alpha`; `lambda`
for ties and dare) for the keys they name:
- UNet keys: the block weight of the key's block when `blocks` is given, else `components.unet`,
  else the step's own weight;
- text encoder keys: `components.text_encoder`, else the BASE block weight, else the step's weight;
- VAE, EMA and everything else: with `vae_from: merge` (the default, A1111's key set) every key
  whose name contains "model" is merged with the step's weight (the VAE and the EMA included;
  `alphas_cumprod` and the other scheduler buffers are not); with `vae_from: A` (wb's key set
  before 0.x) they are merged only when `components` names them, else copied from A.
`discard` is a regular expression: matching keys are left out of the output (A1111's "Discard
weights with matching name").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.documents import load_yaml_file, parse_json
from workbench.errors import WorkbenchError
from workbench.merge.blocks import parse_blocks
from workbench.merge.methods import LORA_METHOD, Method, check_params, get_method
from workbench.merge.recipe_schema import check_document

RECIPE_FORMAT = "wb-merge-recipe/1"
DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
COMPONENTS = ("unet", "text_encoder", "vae", "ema", "other")
VAE_FROM = ("merge", "A")  # A1111's key set (every "model" key), or VAE / EMA / buffers copied from A
COMPONENT_ALIASES = {
    "te": "text_encoder",
    "clip": "text_encoder",
    "text_encoder_2": "text_encoder",
    "model_ema": "ema",
    "diffuser": "unet",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class Input:
    name: str
    path: str
    sha256: str | None = None
    size: int | None = None


@dataclass
class Step:
    name: str
    method: str
    inputs: list[str]
    params: dict[str, float]
    components: dict[str, float] = field(default_factory=dict)
    blocks: list[float] | None = None

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    def weight(
        self, component: str, block_index: int | None, key: str = "", a1111_keys: bool = False
    ) -> float | None:
        """The weight parameter's value for a key of `component` in block `block_index` (None: not
        merged, the step passes its first input through). See the module docstring for the rules."""
        main = self.params[self.spec.weight_param]
        if component not in ("unet", "text_encoder", "text_encoder_2") and component not in self.components:
            return main if a1111_keys and "model" in key else None
        if component == "unet":
            if self.blocks is not None and block_index is not None:
                return self.blocks[block_index]
            return self.components.get("unet", main)
        if component in ("text_encoder", "text_encoder_2"):
            if "text_encoder" in self.components:
                return self.components["text_encoder"]
            if self.blocks is not None:
                return self.blocks[0]  # BASE
            return main
        return self.components.get(component)

    def key_params(self, weight: float) -> dict[str, float]:
        return {**self.params, self.spec.weight_param: weight}


@dataclass
class Recipe:
    inputs: list[Input]
    steps: list[Step]
    output: str
    dtype: str = "fp16"
    vae_from: str = "merge"
    discard: str | None = None

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def step(self, name: str) -> Step | None:
        # A name -> step index, rebuilt whenever the list changed: planning asks this for every key
        # of every step, and a 1,500-step recipe would otherwise be quadratic per key.
        found = self._index().get(name)
        if found is not None and found.name == name:
            return found
        if found is not None:  # a step renamed in place: rebuild and ask again
            self.__dict__.pop("_step_index", None)
            return self._index().get(name)
        return None

    def _index(self) -> dict[str, Step]:
        cached = self.__dict__.get("_step_index")
        if cached is None or cached[0] is not self.steps or cached[1] != len(self.steps):
            index = {}
            for s in self.steps:
                index.setdefault(s.name, s)
            cached = (self.steps, len(self.steps), index, {})
            self.__dict__["_step_index"] = cached
        return cached[2]

    def root_input(self, node: str) -> str:
        """The input a node's keys come from: a step's value is shaped like its first input's."""
        self._index()
        roots = self.__dict__["_step_index"][3]
        if node not in roots:
            walked = []
            while (step := self.step(node)) is not None and node not in roots:
                walked.append(node)
                node = step.inputs[0]
            root = roots.get(node, node)
            for name in walked:
                roots[name] = root
            roots.setdefault(node, root)
            return root
        return roots[node]

    @property
    def output_step(self) -> Step:
        step = self.step(self.output)
        assert step is not None, "validated recipes name an existing output step"
        return step

    def to_dict(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "inputs": [asdict(i) for i in self.inputs],
            "steps": [asdict(s) for s in self.steps],
            "output": self.output,
            "dtype": self.dtype,
            "vae_from": self.vae_from,
            "discard": self.discard,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def single_step(
    method_name: str,
    paths: list[str | os.PathLike],
    params: Mapping[str, float],
    components: Mapping[str, float | None] | None = None,
    blocks: list[float] | None = None,
    dtype: str = "fp16",
    vae_from: str = "merge",
    discard: str | None = None,
) -> Recipe:
    """The recipe of one CLI merge: inputs named by their role (A, B, C, or base, M1, M2, ...)."""
    method = get_method(method_name)
    roles = method.input_roles(len(paths))
    inputs = [Input(role, str(p)) for role, p in zip(roles, paths, strict=True)]
    comps = {k: v for k, v in (components or {}).items() if v is not None}
    step = Step("merge", method.name, roles, dict(params), comps, blocks)
    return validate(Recipe(inputs, [step], "merge", dtype, vae_from, discard), "command line")


def validate(recipe: Recipe, where: str) -> Recipe:
    """Check names, references, methods, parameters and the dtype; return the recipe pruned to the
    steps that the output needs, with every parameter filled in."""
    if recipe.dtype not in DTYPES:
        raise WorkbenchError(f"{where}: dtype {recipe.dtype!r} is not one of {', '.join(DTYPES)}")
    vae_from = {"merge": "merge", "a": "A"}.get(str(recipe.vae_from).lower())
    if vae_from is None:
        raise WorkbenchError(f"{where}: vae_from {recipe.vae_from!r} is not one of merge, A")
    recipe.vae_from = vae_from
    if recipe.discard is not None:
        if not isinstance(recipe.discard, str) or not recipe.discard:
            raise WorkbenchError(f"{where}: discard must be a regular expression (a non-empty string)")
        try:
            re.compile(recipe.discard)
        except re.error as e:
            bad = f"{where}: discard {recipe.discard!r} is not a regular expression: {e}"
            raise WorkbenchError(bad) from None
    names: set[str] = set()
    for inp in recipe.inputs:
        _check_name(inp.name, where, names)
        if not inp.path:
            raise WorkbenchError(f"{where}: input {inp.name!r} has no path")
        names.add(inp.name)
    if not recipe.steps:
        raise WorkbenchError(f"{where}: no steps")
    recipe.steps = _in_dependency_order(recipe.steps, names, where)
    for step in recipe.steps:
        here = f"{where}: step {step.name!r}"
        _check_name(step.name, where, names)
        method = get_method(step.method)
        step.method = method.name
        if method.n_inputs is None:
            if len(step.inputs) < 2:
                raise WorkbenchError(f"{here}: {method.name} needs a base and at least one model")
        elif len(step.inputs) != method.n_inputs:
            raise WorkbenchError(
                f"{here}: {method.name} takes {method.n_inputs} inputs, got {len(step.inputs)}"
            )
        for ref in step.inputs:
            if ref not in names:
                raise WorkbenchError(f"{here}: input {ref!r} is neither an input nor a step")
        if method.name == LORA_METHOD and recipe.input(step.inputs[1]) is None:
            raise WorkbenchError(f"{here}: the LoRA (second input) must be an input file, not a step")
        step.params = check_params(method, dict(step.params), here)
        step.components = _check_components(step.components, here)
        if step.blocks is not None:
            step.blocks = parse_blocks(step.blocks, None, f"{here}: blocks")
            if "unet" in step.components:
                raise WorkbenchError(
                    f"{here}: a UNet weight and block weights both set the UNet's weight; give one"
                )
        names.add(step.name)
    if recipe.step(recipe.output) is None:
        raise WorkbenchError(f"{where}: output {recipe.output!r} is not a step")
    loras = lora_inputs(recipe)
    for step in recipe.steps:
        models = step.inputs[:1] if step.method == LORA_METHOD else step.inputs
        for ref in models:
            if ref in loras:
                raise WorkbenchError(f"{where}: step {step.name!r}: {ref!r} is a LoRA, not a model to merge")
    return _prune(recipe)


def lora_inputs(recipe: Recipe) -> set[str]:
    """The inputs that are LoRA files: the second input of every `lora` step."""
    return {s.inputs[1] for s in recipe.steps if s.method == LORA_METHOD and len(s.inputs) > 1}


def _in_dependency_order(steps: list[Step], input_names: set[str], where: str) -> list[Step]:
    """Steps ordered so each comes after the steps it uses (a YAML mapping may list them in any
    order); a cycle is refused, naming a step on it. A depth-first walk with its own stack: a chain
    of thousands of steps listed last-first would pass Python's recursion limit."""
    by_name = {s.name: s for s in steps}
    ordered: list[Step] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"
    for root in steps:
        if state.get(root.name) == "done":
            continue
        if state.get(root.name) == "visiting":
            raise WorkbenchError(f"{where}: step {root.name!r} depends on itself (a cycle)")
        state[root.name] = "visiting"
        stack = [(root, iter(root.inputs))]
        while stack:
            step, refs = stack[-1]
            for ref in refs:
                if ref not in by_name or ref in input_names or state.get(ref) == "done":
                    continue
                if state.get(ref) == "visiting":
                    raise WorkbenchError(f"{where}: step {ref!r} depends on itself (a cycle)")
                state[ref] = "visiting"
                stack.append((by_name[ref], iter(by_name[ref].inputs)))
                break
            else:
                stack.pop()
                state[step.name] = "done"
                ordered.append(step)
    return ordered


def _check_name(name: str, where: str, taken: set[str]) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise WorkbenchError(f"{where}: bad name {name!r} (letters, digits, _ . -)")
    if name in taken:
        raise WorkbenchError(f"{where}: name {name!r} is used twice")


def _check_components(components: Mapping, where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (components or {}).items():
        comp = COMPONENT_ALIASES.get(str(name), str(name))
        if comp not in COMPONENTS:
            raise WorkbenchError(f"{where}: unknown component {name!r} (one of {', '.join(COMPONENTS)})")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkbenchError(f"{where}: weight of {name!r} must be a number, got {value!r}")
        out[comp] = float(value)
    return out


def _prune(recipe: Recipe) -> Recipe:
    """Keep only what the output needs, so a YAML file may hold several mixes sharing inputs."""
    needed: set[str] = set()
    pending = [recipe.output]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        step = recipe.step(name)
        if step is not None:
            pending.extend(step.inputs)
    return Recipe(
        [i for i in recipe.inputs if i.name in needed],
        [s for s in recipe.steps if s.name in needed],
        recipe.output,
        recipe.dtype,
        recipe.vae_from,
        recipe.discard,
    )


def from_dict(doc: Mapping, where: str, base_dir: Path | None = None) -> tuple[Recipe, str | None]:
    """A recipe from a parsed YAML/JSON document, and the output path it names (if any).

    Relative input paths resolve against `base_dir` (the current directory when None)."""
    if not isinstance(doc, Mapping):
        raise WorkbenchError(f"{where}: a recipe is a mapping with inputs, steps and output")
    fields = {"format", "inputs", "steps", "output", "dtype", "description", "vae_from", "discard"}
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise WorkbenchError(f"{where}: unknown field {unknown[0]!r}")
    inputs = _inputs_from(doc.get("inputs"), where, base_dir)
    steps = _steps_from(doc.get("steps"), where)
    output = doc.get("output")
    out_path = None
    if isinstance(output, Mapping):
        out_path = output.get("path")
        output = output.get("step")
    if output is None and steps:
        output = steps[-1].name
    dtype = str(doc.get("dtype", "fp16"))
    recipe = Recipe(inputs, steps, str(output), dtype, str(doc.get("vae_from", "merge")), doc.get("discard"))
    return recipe, (str(out_path) if out_path else None)


def _inputs_from(raw, where: str, base_dir: Path | None) -> list[Input]:
    if not isinstance(raw, Mapping) and not isinstance(raw, list):
        raise WorkbenchError(f"{where}: inputs must map names to paths")
    items = raw.items() if isinstance(raw, Mapping) else [(e.get("name"), e) for e in raw]
    inputs = []
    for name, entry in items:
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": str(entry)}
        if not isinstance(entry, Mapping) or not entry.get("path"):
            raise WorkbenchError(f"{where}: input {name!r} needs a path")
        path = Path(os.path.expanduser(str(entry["path"])))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        inputs.append(Input(str(name), str(path), entry.get("sha256"), entry.get("size")))
    return inputs


STEP_FIELDS = {"name", "method", "inputs", "params", "components", "blocks"}


def _steps_from(raw, where: str) -> list[Step]:
    if isinstance(raw, Mapping):
        raw = [{"name": name, **(body or {})} for name, body in raw.items()]
    if not isinstance(raw, list):
        raise WorkbenchError(f"{where}: steps must be a list or a mapping of named steps")
    steps = []
    for i, body in enumerate(raw):
        if not isinstance(body, Mapping):
            raise WorkbenchError(f"{where}: step {i + 1} is not a mapping")
        name = str(body.get("name") or f"step{i + 1}")
        if "method" not in body:
            raise WorkbenchError(f"{where}: step {name!r} has no method")
        try:
            method = get_method(str(body["method"]))
        except WorkbenchError as e:
            raise WorkbenchError(f"{where}: step {name!r}: {e}") from None
        params = dict(body.get("params") or {})
        for k, v in body.items():  # method parameters may sit at the top of the step
            if k in STEP_FIELDS:
                continue
            if k in method.params:
                params[k] = v
            else:
                raise WorkbenchError(f"{where}: step {name!r}: unknown field {k!r}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise WorkbenchError(f"{where}: step {name!r}: inputs must be a list of names")
        blocks = body.get("blocks")
        if blocks is not None and not isinstance(blocks, (str, list)):
            raise WorkbenchError(f"{where}: step {name!r}: blocks must be a list or a comma-separated string")
        components = body.get("components") or {}
        if not isinstance(components, Mapping):
            raise WorkbenchError(f"{where}: step {name!r}: components must map component names to weights")
        steps.append(Step(name, method.name, list(inputs), params, dict(components), blocks))
    return steps


def load_yaml(
    path: str | os.PathLike, overrides: Mapping[str, str] | None = None, output: str | None = None
) -> tuple[Recipe, str | None]:
    """Read a YAML recipe; `overrides` replace input paths by name, `output` picks another step."""
    p = Path(path)
    doc = load_yaml_file(p, "")
    check_document(doc, str(p))
    recipe, out_path = from_dict(doc, str(p))
    for name, new_path in (overrides or {}).items():
        inp = recipe.input(name)
        if inp is None:
            raise WorkbenchError(f"--input {name}={new_path}: the recipe has no input {name!r}")
        inp.path, inp.sha256, inp.size = str(new_path), None, None
    if output is not None:
        if recipe.step(output) is None:
            raise WorkbenchError(f"--step {output}: {p} has no step {output!r}")
        recipe.output, out_path = output, None
    return validate(recipe, str(p)), out_path


def from_json(text: str, where: str) -> Recipe:
    try:
        doc = parse_json(text, where)
    except WorkbenchError:
        raise WorkbenchError(f"{where}: the recorded recipe is not valid JSON") from None
    found = doc.get("format") if isinstance(doc, Mapping) else None
    if found != RECIPE_FORMAT:
        raise WorkbenchError(f"{where}: not a wb merge recipe (format {found!r}, expected {RECIPE_FORMAT})")
    check_document(doc, where)
    try:
        inputs = [Input(**i) for i in doc["inputs"]]
        steps = [Step(**s) for s in doc["steps"]]
        # Recorded before vae_from existed: those merges copied the VAE, EMA and buffers from A.
        vae_from, discard = doc.get("vae_from", "A"), doc.get("discard")
        recipe = Recipe(inputs, steps, doc["output"], doc["dtype"], vae_from, discard)
    except (KeyError, TypeError) as e:
        raise WorkbenchError(f"{where}: malformed recipe ({e})") from None
    return validate(recipe, where)
