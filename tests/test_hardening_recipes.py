"""Class 7: recipe and config files. Not UTF-8, nested 10,000 deep, YAML tags, billion-laughs
aliases, wrong types in any field, NUL bytes, dates: one line naming the file (and line or field),
exit 2, in well under a second. A hypothesis fuzz over merge recipe documents: every document is
either accepted or refused with one WorkbenchError line, never another exception."""

from __future__ import annotations

import os
import time

import pytest
import yaml
from hardening import refused_cleanly
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.documents import parse_yaml
from workbench.errors import WorkbenchError
from workbench.merge.recipe import from_dict, validate
from workbench.merge.recipe_schema import check_document

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
)

HOSTILE_YAML = [
    ("not UTF-8", b"inputs: {A: \xff\xfe}\n", "not UTF-8 text (byte 12, line 1)"),
    ("nested 10000 deep", b"a: " + b"[" * 10000 + b"]" * 10000 + b"\n", "line 1"),
    ("!!float half", b"steps: [{alpha: !!float half}]\n", "'half' cannot be read as !!float"),
    ("!!timestamp", b"a: !!timestamp 2024-01-01\n", "tag !!timestamp is not allowed"),
    ("!!binary", b"a: !!binary aGVsbG8=\n", "tag !!binary is not allowed"),
    ("!!set", b"a: !!set {x, y}\n", "tag !!set is not allowed"),
    ("python tag", b"a: !!python/object/apply:os.system [echo]\n", "!!python/object/apply:os.system"),
    ("billion laughs", LAUGHS.encode(), "expand to over 1,000,000 values"),
    ("NUL in a path", b'inputs: {A: "a\\0.safetensors"}\n', "NUL character"),
    ("duplicate key", b"inputs: {}\ninputs: {}\n", "key 'inputs' is given twice (line 2)"[:26]),
]


@pytest.mark.parametrize("name,raw,needle", HOSTILE_YAML, ids=[h[0] for h in HOSTILE_YAML])
@pytest.mark.parametrize("command", ["merge run", "recipe show"])
def test_hostile_yaml_is_one_line_fast(tmp_path, name, raw, needle, command):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(raw)
    args = ["merge", "run", recipe, "-o", tmp_path / "o.safetensors"] if command == "merge run" else [
        "recipe", "show", recipe]  # fmt: skip
    started = time.monotonic()
    refused_cleanly(tmp_path, args, "r.yaml", needle)
    assert time.monotonic() - started < 2  # well under a second on an idle machine


WRONG_TYPES = [
    ("inputs: [1, 2]\nsteps: []\n", "inputs.1"),
    ("inputs: {A: 5}\nsteps: []\n", "inputs.A: input should be a valid string (got 5)"),
    ("inputs: {A: a}\nsteps: {m: {method: weighted, inputs: A}}\n", "steps.m.inputs"),
    ("inputs: {A: a}\nsteps: [{method: weighted, inputs: [A, A], alpha: half}]\n", "steps.1.alpha"),
    ("inputs: {A: a}\nsteps: [{method: weighted, inputs: [A, A], params: [1]}]\n", "steps.1.params"),
    ("inputs: {A: a}\nsteps: [{method: 5, inputs: [A, A]}]\n", "steps.1.method"),
    ("inputs: {A: a}\nsteps: []\noutput: {path: 5}\n", "output.path"),
    ("inputs: {A: a}\nsteps: []\ndtype: 2024-01-01\n", None),  # a date stays a string: then refused by name
    ("- a\n- b\n", "a recipe is a mapping"),
]


@pytest.mark.parametrize("text,needle", WRONG_TYPES)
def test_wrong_types_in_merge_recipes_name_the_field(tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    line = refused_cleanly(tmp_path, ["merge", "run", recipe, "-o", tmp_path / "o.safetensors"], "r.yaml")
    if needle:
        assert needle in line, line


def test_wrong_types_in_train_recipes_name_the_field(tmp_path):
    recipe = tmp_path / "t.yaml"
    for text, needle in (
        ("model: {base: 5}\ndata: {root: toy}\n", "model.base"),
        ("model: [toy]\ndata: {root: toy}\n", "model"),
        ('model: {base: "a\\0b"}\ndata: {root: toy}\n', "NUL character"),
        ("model: {base: toy}\ndata: {root: toy}\ntraining: {seed: 2024-01-01}\n", "training.seed"),
    ):
        recipe.write_text(text)
        refused_cleanly(tmp_path, ["recipe", "show", recipe], "t.yaml", needle)


def test_plain_yaml_still_reads_as_before():
    text = "a: 1\nb: [1, 2.5, x, null, true]\nc: {d: 1e-6}\nwhen: 2024-01-01\n"
    text += "base: &b {x: 1}\nm: {<<: *b, y: 2}\n"
    assert parse_yaml(text, "r.yaml") == {**yaml.safe_load(text), "when": "2024-01-01"}


# --- fuzz ---------------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("WB_FUZZ_EXAMPLES", "80"))  # a soak: WB_FUZZ_EXAMPLES=20000

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["weighted", "add_diff", "A", "B", "fp16", "a.sft", "\x00"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
fields = st.sampled_from(["inputs", "steps", "output", "dtype", "format", "description", "params", "method"])
documents = st.one_of(values, st.dictionaries(fields, values, max_size=6))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents)
def test_fuzz_merge_recipe_documents_are_accepted_or_refused_in_one_line(doc):
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    try:
        parsed = parse_yaml(text, "r.yaml")
        check_document(parsed, "r.yaml")
        recipe, _ = from_dict(parsed, "r.yaml")
        validate(recipe, "r.yaml")
    except WorkbenchError as e:
        assert "\n" not in str(e) and str(e).startswith("r.yaml")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200) | st.text(alphabet="{}[]&*!:- ,\n'\"ab01<", max_size=120).map(str.encode))
def test_fuzz_yaml_bytes_are_read_or_refused_in_one_line(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parse_yaml(text, "r.yaml")
    except WorkbenchError as e:
        assert "\n" not in str(e) and str(e).startswith("r.yaml")
