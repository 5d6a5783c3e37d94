"""wb grid without a model: axis value syntax, the plan, PNG info, samplers, the grid geometry."""

import random

import pytest
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.grids import layout
from workbench.grids.axes import checkpoint_names, label_for, parse_axis_values, parse_numbers, split_csv
from workbench.grids.plan import GridRequest, assign_axes, make_plan
from workbench.grids.pnginfo import format_parameters, parse_parameters, read_parameters, save_png
from workbench.grids.samplers import available, make_scheduler, resolve

# --- A1111 axis value syntax ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-5 (+2)", [1, 3, 5]),
        ("1-6 (+2)", [1, 3, 5]),
        ("10-1 (-3)", [10, 7, 4, 1]),
        ("1-10 [5]", [1, 3, 5, 7, 10]),  # linspace, truncated to int as A1111 does
        ("5-1", [5, 4, 3, 2, 1]),
        ("-1", [-1]),
        ("1, 3,10-12", [1, 3, 10, 11, 12]),
        ("7 [1]", None),
    ],
)
def test_integer_ranges(text, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse_numbers(text, as_int=True)
    else:
        assert parse_numbers(text, as_int=True) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5-8 (+0.5)", [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]),
        ("5.5-7.5 [3]", [5.5, 6.5, 7.5]),
        ("0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),  # no float drift: the count is computed first
        ("7, 7.5", [7.0, 7.5]),
        ("3-1 (-0.5)", [3.0, 2.5, 2.0, 1.5, 1.0]),
    ],
)
def test_float_ranges(text, expected):
    assert parse_numbers(text, as_int=False) == expected


@pytest.mark.parametrize("text", ["1-5 (+0)", "1-5 (-1)", "1-5 (+0.5)", "abc", "1-2-3", ""])
def test_bad_integer_values_are_refused(text):
    with pytest.raises(ValueError):
        parse_numbers(text, as_int=True)


def test_float_range_without_step_counts_by_one_as_in_a1111():
    assert parse_numbers("5-8", as_int=False) == [5.0, 6.0, 7.0, 8.0]


def test_quoted_csv_keeps_commas():
    assert split_csv('"red, bright", blue ,"a ""quoted"" word"') == ["red, bright", "blue", 'a "quoted" word']


def test_axis_values_name_the_flag():
    with pytest.raises(WorkbenchError, match=r"^--seeds 'x1'"):
        parse_axis_values("seed", "x1")
    with pytest.raises(WorkbenchError, match=r"^--cfg"):
        parse_axis_values("cfg", "5-9 (-1)")
    assert parse_axis_values("steps", "10-30 (+10)") == [10, 20, 30]


def test_labels():
    assert label_for("cfg", 7.0) == "CFG: 7"
    assert label_for("cfg", 7.5) == "CFG: 7.5"
    assert label_for("seed", 3) == "Seed: 3"
    assert label_for("prompt", "a cat") == "a cat"


def test_checkpoint_names_are_stems_never_substrings(tmp_path):
    paths = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors", tmp_path / "m.ckpt"]
    assert checkpoint_names(paths) == ["a/model", "b/model", str(tmp_path.name) + "/m"]
    assert checkpoint_names([tmp_path / "v1.safetensors", tmp_path / "v1-ema.safetensors"]) == [
        "v1",
        "v1-ema",
    ]


# --- the plan -------------------------------------------------------------------------------------


@pytest.fixture
def ckpts(tmp_path):
    # The plan only checks that the files exist; it never opens them.
    paths = []
    for name in ("a", "b", "c"):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(b"x")
        paths.append(p)
    return paths


def request(ckpts, **kw):
    base = dict(checkpoints=ckpts[:2], prompts=["a red circle", "a blue square"], seeds=[1, 2], steps=[3])
    base.update(kw)
    return GridRequest(width=64, height=64, **base)


def test_default_axes_checkpoint_prompt_seed(ckpts):
    plan = make_plan(request(ckpts))
    assert [plan.axes[p].kind for p in "xyz"] == ["checkpoint", "prompt", "seed"]
    assert plan.images == 8 and plan.total_steps == 24 and plan.shape() == (2, 2, 2)
    # File order is reading order: sub-grid, row, column.
    assert [(c.z, c.y, c.x) for c in plan.cells] == sorted((c.z, c.y, c.x) for c in plan.cells)
    assert plan.cells[5].file == "cells/0005.png"
    assert (plan.cells[5].x, plan.cells[5].y, plan.cells[5].z) == (1, 0, 1)


def test_checkpoint_is_the_outermost_render_loop_wherever_it_sits(ckpts):
    plan = make_plan(request(ckpts, axes={"x": "seed", "y": "prompt", "z": "checkpoint"}))
    order = [c.checkpoint for c in plan.render_order()]
    assert order == sorted(order, key=plan.checkpoints.index)  # each checkpoint in one run
    assert len(plan.checkpoints) == 2


def test_explicit_axes_and_free_positions(ckpts):
    placed = assign_axes(request(ckpts, cfgs=[5.0, 7.0], seeds=[1], axes={"x": "cfg"}))
    assert placed == {"x": "cfg", "y": "checkpoint", "z": "prompt"}
    placed = assign_axes(request(ckpts[:1], prompts=["p"], seeds=[1]))
    assert placed == {"x": None, "y": None, "z": None}


def test_too_many_varying_parameters_name_the_flags(ckpts):
    with pytest.raises(WorkbenchError, match=r"--cfg and --steps: several values"):
        assign_axes(request(ckpts, cfgs=[5.0, 7.0], steps=[3, 4]))
    with pytest.raises(WorkbenchError, match=r"^--x 'colour': unknown axis kind"):
        assign_axes(request(ckpts, axes={"x": "colour"}))
    with pytest.raises(WorkbenchError, match=r"^--y seed: seed is already on another axis"):
        assign_axes(request(ckpts, axes={"x": "seed", "y": "seed"}))


def test_seed_minus_one_is_resolved_once_and_recorded(ckpts):
    plan = make_plan(request(ckpts, seeds=[-1]), rng=random.Random(5))
    seeds = {c.seed for c in plan.cells}
    assert len(seeds) == 1 and -1 not in seeds
    assert plan.resolved_seeds == {0: seeds.pop()}


def test_size_guard(ckpts):
    big = request(ckpts, seeds=list(range(40)), prompts=[f"p{i}" for i in range(20)])
    big.width = big.height = 1024
    with pytest.raises(WorkbenchError, match=r"megapixels, over the 200 MP limit.*--force"):
        make_plan(big)
    plan = make_plan(big, force=True)
    assert plan.megapixels > 200 and plan.images == 2 * 20 * 40


def test_prompt_sr_first_cell_keeps_the_original(ckpts):
    req = request(ckpts[:1], prompts=["a red circle"], seeds=[1], sr=["red", "green", "blue"])
    req.negative = "red blur"
    plan = make_plan(req)
    assert plan.axes["x"].kind == "sr"
    assert [c.prompt for c in plan.cells] == ["a red circle", "a green circle", "a blue circle"]
    assert [c.negative for c in plan.cells] == ["red blur", "green blur", "blue blur"]
    with pytest.raises(WorkbenchError, match=r"^--sr: 'purple' is in none of the prompts"):
        make_plan(request(ckpts, sr=["purple", "green"]))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"steps": [0]}, r"^--steps 0"),
        ({"cfgs": [-1.0]}, r"^--cfg -1"),
        (
            {"samplers": ["k_euler_fancy"]},
            r"^--sampler 'k_euler_fancy': unknown sampler; known: euler, euler_a",
        ),
        ({"prompts": []}, r"^--prompts"),
        ({"checkpoints": []}, r"^--ckpts"),
    ],
)
def test_bad_requests_name_the_flag(ckpts, kw, message):
    with pytest.raises(WorkbenchError, match=message):
        make_plan(request(ckpts, **kw))


def test_missing_or_repeated_checkpoint(ckpts, tmp_path):
    with pytest.raises(WorkbenchError, match=r"^--ckpts .*nope.safetensors: no such file"):
        make_plan(request([ckpts[0], tmp_path / "nope.safetensors"]))
    with pytest.raises(WorkbenchError, match="listed twice"):
        make_plan(request([ckpts[0], ckpts[0]]))


# --- PNG info -------------------------------------------------------------------------------------


FIELDS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M Karras",
    "CFG scale": "7.5",
    "Seed": 123,
    "Size": "512x768",
    "Model hash": "0123456789",
    "Model": "my model, v2",  # a comma: written as a JSON string, as A1111 does
}


def test_parameters_in_a1111_format():
    text = format_parameters("a cat, sitting", "blurry, lowres", FIELDS)
    assert text == (
        "a cat, sitting\nNegative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, "
        'Model hash: 0123456789, Model: "my model, v2"'
    )
    assert "Negative prompt" not in format_parameters("a cat", "", FIELDS)


def test_png_info_round_trip(tmp_path):
    text = format_parameters("a cat\non two lines", "blurry", FIELDS)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "c.png", text)
    assert read_parameters(path) == text
    parsed = parse_parameters(read_parameters(path))
    assert parsed == {"prompt": "a cat\non two lines", "negative_prompt": "blurry",
                      **{k: str(v) for k, v in FIELDS.items()}}  # fmt: skip
    assert parse_parameters(format_parameters("p", "", FIELDS))["negative_prompt"] == ""


# --- samplers -------------------------------------------------------------------------------------


def test_sampler_names():
    assert resolve("euler_a").display == "Euler a"
    assert resolve("Euler a").key == "euler_a"
    assert resolve("DPM++ 2M Karras").key == "dpm++2m"
    assert resolve("pndm").display == "PLMS"
    assert {"euler", "euler_a", "dpm++2m", "dpm2", "ddim", "pndm", "unipc", "heun"} <= set(
        available()
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 deprecations inside diffusers' K-DPM2
def test_every_sampler_builds_from_an_sd_scheduler_config():
    from workbench.toy.model import TOY_SCHEDULER

    for sampler in available().values():
        scheduler = make_scheduler(sampler, TOY_SCHEDULER)
        assert type(scheduler).__name__ == sampler.scheduler
        assert scheduler.config.beta_schedule == "scaled_linear"
    assert make_scheduler(resolve("dpm++2m_karras"), TOY_SCHEDULER).config.use_karras_sigmas


# --- geometry -------------------------------------------------------------------------------------


def test_geometry_is_cells_plus_label_margins():
    geo = layout.geometry(cols=3, rows=2, subgrids=2, cell_w=64, cell_h=48)
    assert geo.width == 2 * (3 * 64 + geo.label_w) + geo.gap
    assert geo.height == geo.title_h + geo.band_h + 2 * 48
    left, top = geo.subgrid_w + geo.gap + geo.label_w, geo.title_h + geo.band_h
    assert geo.cell_box(0, 0, 1) == (left, top, left + 64, top + 48)
    bare = layout.geometry(2, 1, 1, 64, 64, row_labels=False, col_labels=False, titles=False)
    assert (bare.width, bare.height) == (128, 64)


def test_long_labels_shrink_and_wrap_to_fit():
    font, lines = layout.fit_text("a very long prompt " * 4, width=90, height=60, max_size=20)
    assert len(lines) > 1 and font.size < 20
    assert all(font.getlength(line) <= 90 for line in lines)
    font, lines = layout.fit_text("short", width=90, height=60, max_size=20)
    assert font.size == 20 and lines == ["short"]
    font, lines = layout.fit_text("word " * 500, width=40, height=20, max_size=12)
    assert lines[-1].endswith("...")


def test_font_ships_in_the_package():
    assert layout.FONT_PATH.is_file() and layout.FONT_PATH.parent.name == "assets"
