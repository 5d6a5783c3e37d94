"""Long merge recipes (issue 12, class 7): a 1,500-step recipe is read, checked, planned and printed
by `--dry-run` in well under a second, a bad field deep in it is named in one line, and the plan is
what the rules of docs/merge.md give key by key (expectations written out by hand below).

The timing bounds are loose (a shared CI machine): the point is seconds, not the minutes it took."""

from __future__ import annotations

import time

import pytest
import torch
import yaml
from hardening import refused_cleanly, wb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_merge import IN04, M00, OUT11, POS, TE_KEY, TIME_EMBED, VAE_KEY, make_sd1

from workbench.documents import parse_yaml
from workbench.errors import WorkbenchError
from workbench.merge.engine import plan_merge
from workbench.merge.recipe import load_yaml

EMA_NUM = "model_ema.num_updates"
EMA_WEIGHT = "model_ema.diffusion_modelout2weight"


@pytest.fixture
def models(tmp_path):
    a = make_sd1(tmp_path / "a.safetensors", seed=1)
    b = make_sd1(tmp_path / "b.safetensors", seed=2, drop=[IN04])  # B lacks one UNet key
    c = make_sd1(tmp_path / "c.safetensors", seed=3)
    return a, b, c


def chain(path, models, n: int, order=1, step_fields: dict[int, str] | None = None):
    """A chain of n steps, each on the previous one: odd steps weighted(prev, B) alpha 0.01, even
    ones add-diff(prev, B, C) alpha 0.5. `step_fields` replaces the body of some steps."""
    a, b, c = models
    lines = [f"inputs: {{A: '{a}', B: '{b}', C: '{c}'}}", "steps:"]
    bodies = []
    for i in range(1, n + 1):
        prev = "A" if i == 1 else f"s{i - 1}"
        body = (
            f"{{method: weighted, inputs: [{prev}, B], alpha: 0.01}}"
            if i % 2
            else f"{{method: add-diff, inputs: [{prev}, B, C], alpha: 0.5}}"
        )
        bodies.append(f"  s{i}: {(step_fields or {}).get(i, body)}")
    lines += bodies[::order]
    lines.append(f"output: s{n}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_1500_step_dry_run_takes_well_under_a_second(tmp_path, models):
    recipe = chain(tmp_path / "r.yaml", models, 1500)
    warm = chain(tmp_path / "warm.yaml", models, 2)  # imports done before the clock starts
    wb("merge", "run", warm, "-o", tmp_path / "w.safetensors", "--dry-run")
    started = time.perf_counter()
    res = wb("merge", "run", recipe, "-o", tmp_path / "o.safetensors", "--dry-run")
    seconds = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    assert "step s1500: add-diff(s1499, B, C)" in res.stdout and "step s1: weighted(A, B)" in res.stdout
    assert "no tensor data was read" in res.stdout and not (tmp_path / "o.safetensors").exists()
    assert seconds < 2.5, seconds  # 9 s of planning alone before (per key x per step); ~0.3 s now


def test_a_1500_step_plan_is_the_per_key_rule(tmp_path, models):
    """Every key of the chain, against the rule: merged keys get one call per step (weighted alpha
    0.01, add-diff alpha 0.5), the key B lacks passes every step through (copied from A, B named as
    missing), the position ids and integer tensors are never merged. Listed last-first, the same."""
    for order in (1, -1):
        recipe, _ = load_yaml(chain(tmp_path / f"r{order}.yaml", models, 1500, order))
        assert [s.name for s in recipe.steps] == [f"s{i}" for i in range(1, 1501)]  # dependency order
        plan = plan_merge(recipe, with_hash=False)
        try:
            by_key = {k.key: k for k in plan.keys}
            want = [{"alpha": 0.01} if i % 2 else {"alpha": 0.5} for i in range(1, 1501)]
            for key in (TIME_EMBED, M00, OUT11, TE_KEY, VAE_KEY, EMA_WEIGHT):
                kp = by_key[key]
                assert (kp.how, kp.source, kp.chunked) == ("merge", "A", True), key
                assert [c.params for c in kp.calls] == want and all(c.partial is None for c in kp.calls)
            assert (by_key[IN04].how, by_key[IN04].source, by_key[IN04].calls) == ("copy", "A", ())
            assert plan.missing == {IN04: ["B"]}
            assert by_key[POS].how == "position_ids" and by_key[EMA_NUM].how == "int"
            assert by_key["alphas_cumprod"].how == "copy"  # no "model" in its name: A1111 copies it
        finally:
            plan.close()


def test_a_small_recipe_plans_key_by_key_as_the_rules_say(tmp_path, models):
    """Two steps, component weights and block weights, vae_from A: each key's calls written out
    from docs/merge.md's rules."""
    a, b, c = models
    # BASE 0.00, IN00..IN11 0.01..0.12, M00 0.13, OUT00..OUT11 0.14..0.25
    blocks = [i / 100 for i in range(26)]
    doc = {
        "inputs": {"A": str(a), "B": str(b), "C": str(c)},
        "steps": {
            "m1": {"method": "weighted", "inputs": ["A", "B"], "alpha": 0.3, "components": {"te": 0.5}},
            "m2": {"method": "add-diff", "inputs": ["m1", "C", "B"], "alpha": 0.8, "blocks": blocks},
            "m3": {"method": "slerp", "inputs": ["m2", "C"], "alpha": 0.6, "components": {"vae": 0.2}},
        },
        "output": "m3",
        "vae_from": "A",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    recipe, _ = load_yaml(tmp_path / "r.yaml")
    plan = plan_merge(recipe, with_hash=False)
    try:
        got = {k.key: (k.how, k.source, [c and c.params.get("alpha") for c in k.calls]) for k in plan.keys}
        assert got[TIME_EMBED] == ("merge", "A", [0.3, 0.0, 0.6])  # BASE block of m2
        assert got[M00] == ("merge", "A", [0.3, 0.13, 0.6])
        assert got[OUT11] == ("merge", "A", [0.3, 0.25, 0.6])
        assert got[IN04] == ("merge", "A", [None, None, 0.6])  # B lacks it: m1 and m2 pass A through
        assert plan.missing == {IN04: ["B"]}
        assert got[TE_KEY] == ("merge", "A", [0.5, 0.0, 0.6])  # te component, then m2's BASE block
        assert got[VAE_KEY] == ("merge", "A", [None, None, 0.2])  # vae_from A: only where named
        assert got[EMA_WEIGHT] == ("copy", "A", [])
        assert got["alphas_cumprod"] == ("copy", "A", [])
        assert got[POS][0] == "position_ids" and got[EMA_NUM][0] == "int"
        chunked = {k.key: k.chunked for k in plan.keys if k.how == "merge"}
        assert not any(chunked.values())  # slerp needs whole tensors
    finally:
        plan.close()


DEEP_FAULTS = [
    ("{method: add-diff, inputs: [s1399, B, C], alpha: half}", "steps.s1400.alpha"),
    ("{method: add-diff, inputs: [s1399, B, C], alpah: 0.5}", "step 's1400': unknown field 'alpah'"),
    ("{method: add-diff, inputs: s1399, alpha: 0.5}", "steps.s1400.inputs: input should be a valid list"),
    ("{method: add-dif, inputs: [s1399, B, C]}", "step 's1400': unknown merge method 'add-dif'"),
    ("{method: add-diff, inputs: [s1399x, B, C]}", "step 's1400': input 's1399x' is neither"),
    ("{method: add-diff, inputs: [s1399, B, C], alpha: .nan}", "step 's1400': alpha must be a finite"),
    ("{method: add-diff, inputs: [s1399, B, C], components: {foo: 1}}", "step 's1400': unknown component"),
    ("{method: add-diff, inputs: [s1401, B, C]}", "depends on itself (a cycle)"),
]


@pytest.mark.parametrize("body,needle", DEEP_FAULTS, ids=[f[1][:24] for f in DEEP_FAULTS])
def test_a_bad_field_deep_in_a_long_recipe_is_named_fast(tmp_path, models, body, needle):
    recipe = chain(tmp_path / "r.yaml", models, 1500, step_fields={1400: body})
    started = time.perf_counter()
    args = ["merge", "run", recipe, "-o", tmp_path / "o.safetensors", "--dry-run"]
    refused_cleanly(tmp_path, args, "r.yaml", needle)
    assert time.perf_counter() - started < 2


# --- the YAML reader's fast path against the reference loader --------------------------------------


class _Reference(yaml.CSafeLoader):  # PyYAML's own loader on libyaml (wb's parser), dates kept as text
    pass


_Reference.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}

keys = st.text(max_size=6) | st.integers(-5, 5) | st.booleans() | st.none() | st.floats(allow_nan=False)
leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10)
trees = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25,
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(trees, st.sampled_from([None, True, False]))
def test_plain_documents_read_as_the_reference_loader_reads_them(tree, flow):
    text = yaml.safe_dump(tree, default_flow_style=flow, allow_unicode=True)
    try:
        want = yaml.load(text, Loader=_Reference)
    except yaml.YAMLError:
        return
    try:
        got = parse_yaml(text, "r.yaml")
    except WorkbenchError as e:  # wb is stricter (a NUL, a key given twice): one line, never a crash
        assert "\n" not in str(e)
        return
    assert repr(got) == repr(want)  # repr: NaN never equals itself


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet="{}[]&*!:-? ,\n'\"ab01<=.~#|>%@`", max_size=80))
def test_yaml_odd_text_reads_as_the_reference_or_is_refused_in_one_line(text):
    try:
        want = yaml.load(text, Loader=_Reference)
        ok = True
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):
        ok = False
    try:
        got = parse_yaml(text, "r.yaml")
    except WorkbenchError as e:
        assert "\n" not in str(e) and str(e).startswith("r.yaml")
        return
    assert ok, f"the reference refuses {text!r}, wb read {got!r}"
    assert repr(got) == repr(want)


def test_a_1500_step_chain_merges_like_the_chain_by_hand(tmp_path, models):
    """The chain for real (not a dry run): 1,500 steps evaluate one after the other, not as 1,500
    nested calls (RecursionError before), and every merged key is the chain computed step by step."""
    from test_merge import f32

    recipe = chain(tmp_path / "r.yaml", models, 1500)
    recipe.write_text(recipe.read_text() + "dtype: fp32\n")
    out = tmp_path / "o.safetensors"
    res = wb("merge", "run", recipe, "-o", out, "--threads", "2")
    assert res.exit_code == 0, res.output
    a, b, c = (f32(p) for p in models)
    got = f32(out)
    for key in (TIME_EMBED, M00, TE_KEY):
        x = a[key].double()
        for i in range(1, 1501):
            x = x * 0.99 + b[key].double() * 0.01 if i % 2 else x + 0.5 * (b[key].double() - c[key].double())
        torch.testing.assert_close(got[key].double(), x, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[IN04], a[IN04])  # B lacks it: passed through every step


def test_a_step_used_twice_is_not_changed_by_its_first_user(tmp_path, models):
    """Methods work in place on their inputs: a step whose value two later steps use must reach the
    second one unchanged. s3 = (s1 + s2) / 2 with s1 = (A + B) / 2 and s2 = s1 + (B - C)."""
    from test_merge import f32

    a_path, b_path, c_path = models
    recipe = tmp_path / "d.yaml"
    recipe.write_text(
        f"inputs: {{A: '{a_path}', B: '{b_path}', C: '{c_path}'}}\n"
        "steps:\n"
        "  s1: {method: weighted, inputs: [A, B], alpha: 0.5}\n"
        "  s2: {method: add-diff, inputs: [s1, B, C], alpha: 1.0}\n"
        "  s3: {method: weighted, inputs: [s1, s2], alpha: 0.5}\n"
        "output: s3\ndtype: fp32\n"
    )
    out = tmp_path / "o.safetensors"
    assert wb("merge", "run", recipe, "-o", out).exit_code == 0
    a, b, c, got = f32(a_path), f32(b_path), f32(c_path), f32(out)
    for key in (TIME_EMBED, M00, TE_KEY):
        s1 = (a[key] + b[key]) / 2
        s2 = s1 + (b[key] - c[key])
        torch.testing.assert_close(got[key], (s1 + s2) / 2, rtol=1e-6, atol=1e-6)
