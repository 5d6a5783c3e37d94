"""The shape of a merge recipe document (YAML for `wb merge run`, the JSON a merged file records),
checked with pydantic before recipe.py reads it: every field has its type, a wrong one is one line
naming the field (`steps.2.inputs`), never a TypeError deep in the engine."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from workbench.errors import WorkbenchError

MAX_STEPS = 10_000
MAX_INPUTS = 1_000


def _path(value: str) -> str:
    if not value:
        raise ValueError("an empty path")
    if "\x00" in value:
        raise ValueError("a path with a NUL character")
    return value


Path_ = Annotated[StrictStr, AfterValidator(_path)]
Number = StrictInt | StrictFloat
Value = Number | StrictBool | StrictStr | None  # parameters: numbers; the rest is refused by check_params


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputDoc(_Strict):
    name: StrictStr | None = None
    path: Path_
    sha256: StrictStr | None = None
    size: Annotated[StrictInt, Field(ge=0)] | None = None


class StepDoc(BaseModel):
    model_config = ConfigDict(extra="allow")  # a method's parameters may sit at the top of a step

    name: StrictStr | None = None
    method: StrictStr
    inputs: list[StrictStr]
    params: dict[StrictStr, Value] | None = None
    components: dict[StrictStr, Number | None] | None = None
    blocks: StrictStr | list[Number] | None = None


class StepBody(StepDoc):
    method: StrictStr


class OutputDoc(_Strict):
    step: StrictStr | None = None
    path: Path_ | None = None


class RecipeDoc(_Strict):
    format: StrictStr | None = None
    description: StrictStr | None = None
    inputs: Annotated[dict[StrictStr, Path_ | InputDoc], Field(max_length=MAX_INPUTS)] | Annotated[
        list[InputDoc], Field(max_length=MAX_INPUTS)
    ]
    steps: Annotated[list[StepDoc], Field(max_length=MAX_STEPS)] | Annotated[
        dict[StrictStr, StepBody], Field(max_length=MAX_STEPS)
    ]
    output: StrictStr | OutputDoc | None = None
    dtype: StrictStr = "fp16"
    vae_from: StrictStr | None = None  # merge (A1111's key set) or A; absent in recipes recorded before it
    discard: StrictStr | None = None  # a regular expression, checked by recipe.py
    # What a merged file records beside the recipe, for people: read by no one.
    wb_version: object = None
    block_names: object = None
    block_convention: object = None


def check_document(doc: object, where: str) -> None:  # noqa: C901
    """Refuse a recipe document whose fields have the wrong types, naming the first such field."""
    if not isinstance(doc, dict):
        raise WorkbenchError(f"{where}: a recipe is a mapping with inputs, steps and output")
    try:
        RecipeDoc.model_validate(doc)
    except ValidationError as e:
        raise WorkbenchError(f"{where}: {_first_error(e, doc)}") from None
    steps = doc["steps"]
    named = steps.items() if isinstance(steps, dict) else ((str(i + 1), s) for i, s in enumerate(steps))
    for label, step in named:
        for key, value in step.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in StepDoc.model_fields and not number:
                raise WorkbenchError(
                    f"{where}: steps.{label}.{key}: a method parameter must be a number, got {_shown(value)}"
                )


def _first_error(e: ValidationError, doc: dict) -> str:
    """The most telling error: a union reports one failure per alternative; the one that got
    furthest into the document names the field best."""
    errors = e.errors(include_url=False)
    best = max(errors, key=lambda err: len([p for p in err["loc"] if not _is_branch(p)]))
    loc = ".".join(str(p + 1) if isinstance(p, int) else str(p) for p in best["loc"] if not _is_branch(p))
    msg = best["msg"][0].lower() + best["msg"][1:]
    return f"{loc or 'the recipe'}: {msg} (got {_shown(best.get('input'))})"


def _shown(got: object) -> str:
    shown = repr(got) if isinstance(got, (str, int, float, bool, type(None))) else f"a {type(got).__name__}"
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _is_branch(part: object) -> bool:
    """Union branch labels pydantic puts into an error's location."""
    return isinstance(part, str) and (
        part.startswith(("list[", "dict[", "function-after", "constrained-str", "nullable["))
        or part in {"str", "int", "float", "bool", "InputDoc", "StepDoc", "StepBody", "OutputDoc"}
    )
