"""`wb merge` on the command line: commands, errors, recipes (YAML graphs), replay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_merge import IN04, POS, TE_KEY, VAE_KEY, f32, make_sd1, read
from typer.testing import CliRunner

from workbench.checkpoint import safetensors_io
from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.merge.cli import merge_app
from workbench.merge.recipe import load_yaml

ROOT = Path(__file__).resolve().parent.parent


def wb(*args) -> object:
    return CliRunner().invoke(merge_app, [str(a) for a in args])


def same_tensors(x: Path, y: Path) -> bool:
    a, b = read(x), read(y)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and a[k].view(-1).view(torch.uint8).equal(b[k].view(-1).view(torch.uint8))
        for k in a
    )


@pytest.fixture
def models(tmp_path):
    return [make_sd1(tmp_path / f"{n}.safetensors", seed=i + 1) for i, n in enumerate("abcd")]


def test_help_says_alpha_is_the_share_of_b():
    res = wb("weighted", "--help")
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "share of B" in text and "A1111" in text and "ComfyUI" in text
    top = " ".join(wb("--help").output.split())
    for command in (
        "weighted",
        "add-diff",
        "triple-sum",
        "sum-twice",
        "slerp",
        "ties",
        "dare",
        "run",
        "replay",
    ):
        assert command in top


def test_missing_input_is_one_red_line_and_exit_code_2(tmp_path, models):
    res = wb("weighted", tmp_path / "nope.safetensors", models[1], "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope.safetensors'}: no such file or folder"
    ]
    assert not (tmp_path / "o.safetensors").exists()


def test_output_is_required(models):
    res = wb("weighted", models[0], models[1])
    assert res.exit_code == 2 and "-o" in res.output


def test_bad_values_are_refused_in_one_line(tmp_path, models):
    out = tmp_path / "o.safetensors"
    for args, needle in (
        (["--dtype", "fp8"], "dtype 'fp8' is not one of fp16, bf16, fp32"),
        (["--blocks", "0.5,x"], "--blocks: 'x' is not a number"),
        (["--blocks", ",".join(["0.5"] * 20)], "20 values given, this model needs 26"),
    ):
        res = wb("weighted", models[0], models[1], "-o", out, *args)
        assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, (
            res.output
        )


def test_weighted_with_per_component_and_block_options(tmp_path, models):
    out = tmp_path / "o.safetensors"
    blocks = ",".join(["0.1"] * 5 + ["0.9"] + ["0.1"] * 20)  # IN04 is the 6th value
    res = wb(
        "weighted",
        models[0],
        models[1],
        "-o",
        out,
        "--blocks",
        blocks,
        "--te-alpha",
        "0.25",
        "--vae-alpha",
        "1",
        "--dtype",
        "fp32",
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "keys merged" in res.output
    got, a, b = f32(out), f32(models[0]), f32(models[1])
    assert torch.equal(got[IN04], (1 - 0.9) * a[IN04] + 0.9 * b[IN04])
    assert torch.equal(got[TE_KEY], (1 - 0.25) * a[TE_KEY] + 0.25 * b[TE_KEY])
    assert torch.equal(got[VAE_KEY], b[VAE_KEY])
    assert "wb merge weighted" in open_checkpoint(out).metadata["wb.made_by"]


def test_ties_and_dare_take_a_base_and_several_models(tmp_path, models):
    for cmd, extra in (
        ("ties", ["--density", "0.5", "--lambda", "0.9"]),
        ("dare", ["--drop", "0.3", "--seed", "4"]),
    ):
        out = tmp_path / f"{cmd}.safetensors"
        res = wb(cmd, *models[:3], "-o", out, *extra)
        assert res.exit_code == 0, res.output
        assert read(out)[POS].dtype == torch.int64


def test_dry_run_prints_the_plan_and_reads_no_tensor(tmp_path, models, monkeypatch):
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "tensor", lambda self, key: pytest.fail("data read"))
    out = tmp_path / "o.safetensors"
    res = wb("add-diff", *models[:3], "-o", out, "--dry-run")
    assert res.exit_code == 0, res.output
    text = res.output
    for needle in (
        "inputs",
        "sha256",
        "A + alpha * (B - C)",
        "unet",
        "text_encoder",
        "copied from A",
        "no tensor data was read",
    ):
        assert needle in text
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# recipes


def write_recipe(path: Path, models, dtype="fp32") -> Path:
    a, b, c, d = models
    path.write_text(
        yaml.safe_dump(
            {
                "inputs": {"a": str(a), "b": str(b), "c": {"path": str(c)}, "d": str(d)},
                "steps": {
                    "mix": {"method": "weighted", "inputs": ["a", "b"], "alpha": 0.3},
                    "final": {
                        "method": "add-diff",
                        "inputs": ["mix", "c", "d"],
                        "alpha": 0.6,
                        "components": {"te": 0.4},
                    },
                },
                "output": "final",
                "dtype": dtype,
            },
            sort_keys=False,
        )
    )
    return path


def test_a_recipe_graph_equals_the_same_merges_chained_on_the_cli(tmp_path, models):
    recipe = write_recipe(tmp_path / "r.yaml", models)
    graph = tmp_path / "graph.safetensors"
    res = wb("run", recipe, "-o", graph)
    assert res.exit_code == 0, res.output
    a, b, c, d = models
    mix, chain = tmp_path / "mix.safetensors", tmp_path / "chain.safetensors"
    # fp32 in between: a chained CLI merge would otherwise round the intermediate to fp16
    assert wb("weighted", a, b, "--alpha", "0.3", "--dtype", "fp32", "-o", mix).exit_code == 0
    assert (
        wb(
            "add-diff", mix, c, d, "--alpha", "0.6", "--te-alpha", "0.4", "--dtype", "fp32", "-o", chain
        ).exit_code
        == 0
    )
    assert same_tensors(graph, chain)
    # and an fp16 graph equals the fp32 chain rounded once at the end
    graph16, chain16 = tmp_path / "graph16.safetensors", tmp_path / "chain16.safetensors"
    assert wb("run", recipe, "-o", graph16, "--dtype", "fp16").exit_code == 0
    assert wb("add-diff", mix, c, d, "--alpha", "0.6", "--te-alpha", "0.4", "-o", chain16).exit_code == 0
    assert same_tensors(graph16, chain16)


def test_recipe_errors_name_the_field(tmp_path, models):
    bad = tmp_path / "bad.yaml"
    cases = [
        (
            {"inputs": {"a": str(models[0])}, "steps": {"s": {"method": "blend", "inputs": ["a", "a"]}}},
            "unknown merge method 'blend'",
        ),
        (
            {
                "inputs": {"a": str(models[0]), "b": str(models[1])},
                "steps": {
                    "s": {"method": "weighted", "inputs": ["a", "t"]},
                    "t": {"method": "weighted", "inputs": ["s", "b"]},
                },
            },
            "depends on itself (a cycle)",
        ),
        (
            {
                "inputs": {"a": str(models[0])},
                "steps": {"s": {"method": "weighted", "inputs": ["a", "nope"]}},
            },
            "'nope' is neither an input nor a step",
        ),
        (
            {
                "inputs": {"a": str(models[0]), "b": str(models[1])},
                "steps": {"s": {"method": "weighted", "inputs": ["a", "b"], "beta": 0.2}},
            },
            "unknown field 'beta'",
        ),
        (
            {
                "inputs": {"a": str(models[0]), "b": str(models[1])},
                "steps": {"s": {"method": "add-diff", "inputs": ["a", "b"]}},
            },
            "add-diff takes 3 inputs, got 2",
        ),
    ]
    for doc, needle in cases:
        bad.write_text(yaml.safe_dump(doc, sort_keys=False))
        res = wb("run", bad, "-o", tmp_path / "o.safetensors")
        assert res.exit_code == 2 and needle in res.output, res.output
    res = wb("run", tmp_path / "missing.yaml", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "missing.yaml" in res.output


def test_the_shipped_vodka_recipe(tmp_path, models):
    path = ROOT / "recipes" / "vodka_v4_mix.yaml"
    names = dict(zip(["v4", "dadapt", "v2", "v1"], map(str, models), strict=True))
    recipe, out = load_yaml(path, names)
    assert out == "out/vodka_v4_mix.safetensors" and [s.name for s in recipe.steps] == ["v4_dadapt"]
    sink, _ = load_yaml(path, names, output="kitchen_sink")
    assert [s.name for s in sink.steps] == ["v4_dadapt", "kitchen_sink"]
    with pytest.raises(WorkbenchError, match="no input 'v3'"):
        load_yaml(path, {"v3": str(models[0])})
    overrides = [x for n, p in names.items() for x in ("--input", f"{n}={p}")]
    res = wb("run", path, "--step", "kitchen_sink", "-o", tmp_path / "sink.safetensors", *overrides)
    assert res.exit_code == 0, res.output
    got, v4, dadapt, v2, v1 = f32(tmp_path / "sink.safetensors"), *(f32(m) for m in models)
    want = ((1 - 0.5) * v4[IN04] + 0.5 * dadapt[IN04]) + 1.0 * (v2[IN04] - v1[IN04])
    assert torch.equal(got[IN04], want.half().float())


# ---------------------------------------------------------------------------------------------------
# replay


def test_replay_is_bit_identical(tmp_path, models):
    recipe = write_recipe(tmp_path / "r.yaml", models, dtype="fp16")
    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    assert wb("run", recipe, "-o", first, "--threads", "1").exit_code == 0
    res = wb("replay", first, "-o", again, "--threads", "3")
    assert res.exit_code == 0, res.output
    assert same_tensors(first, again)
    assert (
        open_checkpoint(first).metadata["wb.merge_recipe"]
        == open_checkpoint(again).metadata["wb.merge_recipe"]
    )


def test_replay_finds_moved_inputs_by_sha256(tmp_path, models):
    first = tmp_path / "first.safetensors"
    assert wb("dare", *models[:3], "-o", first, "--drop", "0.5", "--seed", "3").exit_code == 0
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    shutil.move(models[1], elsewhere / "renamed.safetensors")
    again = tmp_path / "again.safetensors"
    res = wb("replay", first, "-o", again)
    assert res.exit_code == 2 and "input 'M1'" in res.output and "--search" in res.output
    res = wb("replay", first, "-o", again, "--search", tmp_path / "elsewhere")
    assert res.exit_code == 0, res.output
    assert same_tensors(first, again)


def test_replay_needs_a_wb_recipe(tmp_path, models):
    res = wb("replay", models[0], "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "wb.merge_recipe" in res.output


def test_a_recipe_refuses_an_input_whose_sha256_differs(tmp_path, models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "inputs": {"a": {"path": str(models[0]), "sha256": "0" * 64}, "b": str(models[1])},
        "steps": {"mix": {"method": "weighted", "inputs": ["a", "b"]}},
    }))  # fmt: skip
    res = wb("run", recipe, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "the recipe's input 'a' is 0000000000" in res.output
