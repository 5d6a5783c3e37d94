"""wb grid against A1111's rules, without rendering: axis strings, bounds, schedule types, PNG info,
the X/Y/Z grid infotext and the Prompt order axis.

A1111's values below are worked out by hand from scripts/xyz_grid.py's rules (integer ranges are
`range(start, end + 1, step)`, float ranges `numpy.arange(start, end + step, step)`, counts
`numpy.linspace` truncated for integers, values split by `csv.reader` without skipinitialspace).
"""

import re
import time
import tracemalloc
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from workbench.cli import friendly
from workbench.errors import WorkbenchError
from workbench.grids.axes import parse_axis_values
from workbench.grids.cli import grid
from workbench.grids.infotext import cell_fields, grid_fields
from workbench.grids.plan import GridRequest, make_plan, reorder_prompt
from workbench.grids.pnginfo import format_parameters
from workbench.grids.samplers import SCHEDULES, available, make_scheduler, resolve
from workbench.toy.model import TOY_SCHEDULER

# --- axis strings ---------------------------------------------------------------------------------

# (kind, text, A1111's values, wb's values): equal lists mean wb gives A1111's values and prints no note.
SAME = [
    ("seed", "1-5", [1, 2, 3, 4, 5]),
    ("seed", "1-5 (+2)", [1, 3, 5]),
    ("seed", "1-6 (+2)", [1, 3, 5]),
    ("seed", "1-10 (+3)", [1, 4, 7, 10]),
    ("seed", "1-10 [5]", [1, 3, 5, 7, 10]),  # linspace 1, 3.25, 5.5, 7.75, 10 truncated
    ("seed", "1-10 [1]", [1]),
    ("seed", "-5--1", [-5, -4, -3, -2, -1]),
    ("seed", "1, 3,10-12", [1, 3, 10, 11, 12]),
    ("seed", "-1", [-1]),
    ("cfg", "1-5", [1.0, 2.0, 3.0, 4.0, 5.0]),  # a float range without a step counts by 1
    ("cfg", "5-8 (+0.5)", [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]),
    ("cfg", "3-1 (-0.5)", [3.0, 2.5, 2.0, 1.5, 1.0]),
    ("cfg", "10-1 (-3)", [10.0, 7.0, 4.0, 1.0]),  # arange(10, -2, -3): the float range keeps its end
    ("cfg", "5.5-7.5 [3]", [5.5, 6.5, 7.5]),
    ("cfg", "7, 7.5", [7.0, 7.5]),
    ("sr", 'red,"dark, blue"', ["red", "dark, blue"]),
    ("sr", "red,,blue", ["red", "", "blue"]),  # empty fields are kept: replace by nothing
    ("sr", " a , b ", ["a", "b"]),
    ("sampler", "Euler a,DPM++ 2M", ["Euler a", "DPM++ 2M"]),
]
# (kind, text, A1111's values, wb's values): A1111's arithmetic slips, where wb keeps the inclusive reading.
SLIPS = [
    ("seed", "10-1 (-3)", [10, 7, 4], [10, 7, 4, 1]),  # range(10, 2, -3)
    ("seed", "10-1 (-4)", [10, 6], [10, 6, 2]),  # range(10, 2, -4)
    ("seed", "10-1 (-1)", [10, 9, 8, 7, 6, 5, 4, 3], [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
    ("seed", "5-1", [], [5, 4, 3, 2, 1]),  # range(5, 2)
    ("steps", "30-10 (-10)", [30, 20], [30, 20, 10]),  # range(30, 11, -10)
    ("cfg", "7-8 (+0.3)", [7.0, 7.3, 7.6, 7.9, 8.2], [7.0, 7.3, 7.6, 7.9]),  # arange(7, 8.3, 0.3)
    ("cfg", "1-2.5", [1.0, 2.0, 3.0], [1.0, 2.0]),  # arange(1, 3.5, 1)
    ("cfg", "5-1", [], [5.0, 4.0, 3.0, 2.0, 1.0]),  # arange(5, 2, 1)
    ("cfg", "10-0 (-3)", [10.0, 7.0, 4.0, 1.0, -2.0], [10.0, 7.0, 4.0, 1.0]),  # arange(10, -3, -3)
    ("cfg", "0-1 (+0.4)", [0.0, 0.4, 0.8, 1.2], [0.0, 0.4, 0.8]),  # arange(0, 1.4, 0.4)
]
# Strings A1111 cannot turn into values (an exception or an empty axis): wb refuses them with one line.
REFUSED = [
    ("seed", "1-10 [0]", "the count must be at least 1"),  # linspace(num=0): no values
    ("seed", "1-5 (+0)", "the step must not be 0"),  # range() raises
    ("seed", "1-5 (-1)", "never reaches"),  # range(1, 6, -1): no values
    ("seed", "1,2,", "an empty value"),  # int('') raises
    ("seed", "7 [1]", "not an integer"),
    ("seed", "1.5", "not an integer"),
    ("cfg", "1-5 (-1)", "never reaches"),
    ("cfg", "x", "not a number"),
    ("cfg", "nan", "not a number"),  # A1111 takes float('nan'); a NaN CFG renders nothing useful
]


def fmt(v):
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@pytest.mark.parametrize("kind, text, values", SAME)
def test_axis_strings_give_a1111s_values(kind, text, values):
    notes = []
    assert parse_axis_values(kind, text, notes) == values
    assert notes == []


@pytest.mark.parametrize("kind, text, theirs, ours", SLIPS)
def test_a1111_slips_keep_the_inclusive_reading_and_say_so(kind, text, theirs, ours):
    notes = []
    assert parse_axis_values(kind, text, notes) == ours
    assert len(notes) == 1
    shown = ", ".join(fmt(v) for v in theirs) if theirs else "no values"
    assert f"A1111 gives {shown};" in notes[0] and notes[0].startswith("--")


@pytest.mark.parametrize("kind, text, message", REFUSED)
def test_strings_a1111_cannot_read_are_refused_with_the_flag(kind, text, message):
    with pytest.raises(WorkbenchError, match=re.escape(message)) as err:
        parse_axis_values(kind, text)
    assert str(err.value).startswith("--")


def test_a_quote_after_a_space_is_literal_as_in_a1111_with_a_note():
    notes = []
    # csv.reader without skipinitialspace: ' "dark' and ' blue"' are plain fields, quotes included
    assert parse_axis_values("sr", 'red, "dark, blue"', notes) == ["red", '"dark', 'blue"']
    assert len(notes) == 1 and "literal" in notes[0]


def test_prompt_order_values_are_every_order():
    values = parse_axis_values("prompt_order", "cat,dog,tree")
    assert len(values) == 6 and values[0] == ("cat", "dog", "tree") and ("tree", "dog", "cat") in values


def test_prompt_order_fills_the_slots_in_the_order_they_appear():
    # A1111's rule: slots sorted by first position in the prompt, filled with the order's tokens.
    tokens = ("cat", "dog")
    assert reorder_prompt("a dog and a cat", ("cat", "dog"), tokens) == "a cat and a dog"
    assert reorder_prompt("a dog and a cat", ("dog", "cat"), tokens) == "a dog and a cat"
    three = ("cat", "dog", "tree")
    assert reorder_prompt("cat, dog, tree", ("tree", "cat", "dog"), three) == "tree, cat, dog"


# --- bounds: counted before anything is made --------------------------------------------------------

HUGE = [
    ("seed", "1-10 [100000000]", "100,000,000 values"),
    ("seed", "1-1000000000", "1,000,000,000 values"),
    ("cfg", "1-2 (+0.00000001)", "100,000,001 values"),
    ("cfg", "0-1 [99999999999]", "99,999,999,999 values"),
    ("steps", "1-5000,1-5000,1-5000", "15,000 values"),
    ("prompt_order", "a,b,c,d,e,f,g,h,i,j", "3,628,800 orders"),
    ("seed", "1-" + "9" * 40, "more than 10^30 values"),
    ("cfg", "0-" + "9" * 300 + " (+0.0000000001)", "more than 10^30 values"),
]


@pytest.mark.parametrize("kind, text, count", HUGE)
def test_huge_axes_are_refused_with_the_count_fast_and_small(kind, text, count):
    tracemalloc.start()
    start = time.process_time()  # CPU time: the shared test machine's load does not count
    with pytest.raises(WorkbenchError, match=re.escape(count)):
        parse_axis_values(kind, text)
    elapsed = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 5_000_000, (elapsed, peak)


def wb():
    app = typer.Typer()
    app.command("grid")(friendly(grid))
    app.command("noop")(lambda: None)
    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("a1111")
    ckpt = folder / "a.safetensors"
    ckpt.write_bytes(b"x")  # a dry run only checks that it exists
    prompts = folder / "p.txt"
    prompts.write_text("a red cat\n")
    return ckpt, prompts


def dry(files, *args):
    ckpt, prompts = files
    args = ["grid", "--ckpts", str(ckpt), "--prompts", str(prompts), "--dry-run", *args]
    return CliRunner().invoke(wb(), args)


@pytest.mark.parametrize(
    "args, count",
    [
        (["--seeds", "1-10 [100000000]"], "100,000,000"),
        (["--seeds", "1-1000000000"], "1,000,000,000"),
        (["--cfg", "1-2 (+0.00000001)"], "100,000,001"),
        (["--seeds", "1-400", "--cfg", "1-400", "--x", "seed", "--y", "cfg"], "160,000 cells"),
    ],
)
def test_cli_refuses_huge_axes_in_one_line(files, args, count):
    dry(files, "--seeds", "1")  # warm: the first call imports what the CLI needs
    start = time.process_time()
    result = dry(files, *args)
    assert time.process_time() - start < 1.0
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and count in lines[0]


def test_cli_prints_one_note_for_a_slip(files):
    result = dry(files, "--seeds", "10-1 (-3)")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ["note: --seeds '10-1 (-3)': A1111 gives 10, 7, 4; wb gives 10, 7, 4, 1 (end included)"]


AXIS_TEXT = st.text(alphabet="0123456789-+.,()[] \"x\n", max_size=24)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(
        ["--seeds", "--cfg", "--steps", "--var-strength", "--clip-skip", "--sr", "--scheduler"]
    ),
    text=AXIS_TEXT,
)
def test_fuzz_axis_strings_exit_0_or_one_error_line(files, flag, text):
    result = dry(files, flag, text)
    assert result.exit_code in (0, 2), (flag, text, result.output, result.exception)
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (flag, text, result.output)
    assert "Traceback" not in result.output


# --- schedule types and PNG info, read back with A1111's rules --------------------------------------

# A1111's "Automatic": the sampler's default schedule (sd_samplers_kdiffusion.py), else uniform sigmas.
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                   "DPM2": "Karras", "DPM2 a": "Karras"}  # fmt: skip
A1111_TIMESTEP_SAMPLERS = {"DDIM", "PLMS", "UniPC"}  # their schedule type is not used
A1111_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "beta": "Beta",
                "ddim": "DDIM"}  # fmt: skip
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # infotext_utils.re_param


def a1111_reads(text: str) -> tuple[str, str]:
    """(sampler, schedule type) as A1111 1.10 pastes an infotext: a missing Schedule type is Automatic,
    a schedule suffix on the sampler is split off, and a sampler's own default becomes Automatic."""
    fields = dict(RE_PARAM.findall(text.strip().split("\n")[-1]))
    sampler, schedule = fields["Sampler"], fields.get("Schedule type", "Automatic")
    for label in A1111_LABELS.values():
        if sampler.endswith(" " + label):
            sampler, schedule = sampler[: -len(label) - 1], label
    if A1111_AUTOMATIC.get(sampler) == schedule:
        schedule = "Automatic"
    return sampler, schedule


def a1111_renders_with(sampler: str, schedule: str) -> str:
    if sampler in A1111_TIMESTEP_SAMPLERS:
        return "timesteps"
    return A1111_AUTOMATIC.get(sampler, "Uniform") if schedule == "Automatic" else schedule


@pytest.mark.parametrize("sampler", sorted(available()))
@pytest.mark.parametrize("schedule", [s.key for s in SCHEDULES])
def test_png_info_round_trip_for_every_sampler_and_schedule_type(sampler, schedule, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    req = GridRequest(checkpoints=[ckpt], prompts=["p"], seeds=[1], samplers=[sampler], schedulers=[schedule])
    try:
        cell = make_plan(req).cells[0]
    except WorkbenchError as e:  # diffusers' scheduler for this sampler has no such option
        assert str(e).startswith("--scheduler") and "has no" in str(e)
        return
    text = format_parameters(cell.prompt, "", cell_fields(cell, "0123456789"))
    display = resolve(sampler).display
    asked = A1111_LABELS[schedule]
    read_sampler, read_schedule = a1111_reads(text)
    assert read_sampler == display
    if display not in A1111_TIMESTEP_SAMPLERS:
        assert a1111_renders_with(read_sampler, read_schedule) == a1111_renders_with(display, asked)
    assert f"Sampler: {display}, Schedule type: " in text


def test_schedule_types_set_diffusers_options():
    dpm = resolve("dpm++2m")
    from workbench.grids.samplers import resolve_schedule as sched

    auto = make_scheduler(dpm, TOY_SCHEDULER)
    assert auto.config.use_karras_sigmas and auto.config.timestep_spacing == "linspace"
    uniform = make_scheduler(dpm, TOY_SCHEDULER, sched("uniform"))
    assert not uniform.config.use_karras_sigmas and uniform.config.timestep_spacing == "linspace"
    assert make_scheduler(dpm, TOY_SCHEDULER, sched("Exponential")).config.use_exponential_sigmas
    assert make_scheduler(dpm, TOY_SCHEDULER, sched("SGMUniform")).config.timestep_spacing == "trailing"
    assert not make_scheduler(resolve("euler"), TOY_SCHEDULER).config.use_karras_sigmas  # Euler: uniform


def test_sigma_options_table_matches_diffusers():
    import inspect

    from diffusers import schedulers

    from workbench.grids.samplers import _ALL

    sigma = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"}
    for sampler in _ALL:
        if sampler.timesteps or sampler.key not in available():
            continue
        params = set(inspect.signature(getattr(schedulers, sampler.scheduler).__init__).parameters)
        assert params & sigma == set(sampler.sigma_options), sampler.key
        assert "timestep_spacing" in params, sampler.key


def test_automatic_vae_is_the_file_named_like_the_checkpoint(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b, tmp_path / "a.vae.safetensors"):
        p.write_bytes(b"x")
    plan = make_plan(GridRequest(checkpoints=[a, b], prompts=["p"], seeds=[1], vaes=["automatic"]))
    assert [c.vae for c in plan.cells] == [tmp_path / "a.vae.safetensors", None]
    assert cell_fields(plan.cells[0], None, "h")["VAE"] == "a.vae.safetensors"
    assert "VAE" not in cell_fields(plan.cells[1], None)


def test_a1111_sampler_aliases(tmp_path):
    assert resolve("k_euler_a").key == "euler_a" and resolve("k_dpmpp_2m").key == "dpm++2m"
    assert resolve("K_DPM_2_A").key == "dpm2_a"


def test_old_combined_names_still_work_and_conflicts_are_refused(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    for name in ("dpm++2m_karras", "DPM++ 2M Karras"):
        cell = make_plan(GridRequest(checkpoints=[ckpt], prompts=["p"], seeds=[1], samplers=[name])).cells[0]
        assert (cell.sampler, cell.scheduler) == ("dpm++2m", "karras")
        assert cell_fields(cell, None)["Schedule type"] == "Karras"
    with pytest.raises(WorkbenchError, match="give the schedule type in one place"):
        make_plan(GridRequest(checkpoints=[ckpt], prompts=["p"], seeds=[1], samplers=["dpm++2m_karras"],
                              schedulers=["uniform"]))  # fmt: skip


def test_cell_fields_in_a1111_order_with_its_names(tmp_path):
    a, b = tmp_path / "v1" / "model.safetensors", tmp_path / "v2" / "model.safetensors"
    vae = tmp_path / "vae-ft-mse.safetensors"
    for p in (a, b, vae):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    req = GridRequest(checkpoints=[a, b], prompts=["p"], seeds=[1], samplers=["DPM++ 2M"], vaes=[vae],
                      clip_skips=[2], subseeds=[7], subseed_strengths=[0.25])  # fmt: skip
    plan = make_plan(req)
    assert [c.checkpoint_name for c in plan.cells] == ["v1/model", "v2/model"]  # labels tell them apart
    fields = cell_fields(plan.cells[1], "abcdef0123", "0123456789")
    assert list(fields) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash",
                            "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
                            "Clip skip"]  # fmt: skip
    assert fields["Model"] == "model"  # the stem, as A1111 writes it, even though two stems collide
    assert (fields["VAE"], fields["VAE hash"]) == ("vae-ft-mse.safetensors", "0123456789")
    assert fields["Clip skip"] == 2
    assert (fields["Variation seed"], fields["Variation seed strength"]) == (7, "0.25")
    plain = cell_fields(make_plan(GridRequest(checkpoints=[a], prompts=["p"], seeds=[1])).cells[0], "h")
    assert not {"VAE", "VAE hash", "Variation seed", "Clip skip"} & set(plain)


def test_grid_infotext_is_the_first_cell_plus_the_xyz_fields(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        p.write_bytes(b"x")
    req = GridRequest(checkpoints=[a, b], prompts=["p"], seeds=[5, 6], cfgs=[0.5, 7.0], steps=[3],
                      texts={"seed": "5-6", "cfg": "0.5,7"},
                      axes={"x": "cfg", "y": "checkpoint", "z": "seed"})  # fmt: skip
    plan = make_plan(req)
    first = plan.cells[0]
    line = grid_fields(plan, first, cell_fields(first, "hash"), True)
    text = format_parameters(first.prompt, "", line)
    last = text.split("\n")[-1]
    assert last.endswith(
        'Script: X/Y/Z plot, X Type: CFG Scale, X Values: "0.5,7", Y Type: Checkpoint name, '
        'Y Values: "a,b", Z Type: Seed, Z Values: 5-6, Fixed Z Values: "5, 6"'
    )
    assert last.startswith("Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 0.5, Seed: 5")
    sub = grid_fields(plan, plan.cells[4], cell_fields(plan.cells[4], "hash"), False)
    assert "Z Type" not in sub and sub["Seed"] == 6 and sub["X Type"] == "CFG Scale"


def test_prompt_axis_is_written_as_a_prompt_sr_over_whole_prompts(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    plan = make_plan(GridRequest(checkpoints=[a], prompts=["a cat", "a dog, red"], seeds=[1]))
    line = grid_fields(plan, plan.cells[0], cell_fields(plan.cells[0], None), True)
    assert (line["X Type"], line["X Values"]) == ("Prompt S/R", 'a cat,"a dog, red"')


def test_a_registered_kind_becomes_an_axis_and_reaches_every_cell(tmp_path):
    from workbench.grids.axes import KIND_REGISTRY, AxisKind, register_kind

    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    register_kind(AxisKind("test_weight", "--test-weight", "Test weight", "float", "Weight"))
    try:
        assert parse_axis_values("test_weight", "0.5-1 (+0.25)") == [0.5, 0.75, 1.0]
        req = GridRequest(checkpoints=[a], prompts=["p"], seeds=[1], extra={"test_weight": [0.5, 1.0]})
        plan = make_plan(req)
        assert plan.axes["x"].kind == "test_weight" and plan.axes["x"].labels == ["Weight: 0.5", "Weight: 1"]
        assert [c.extra for c in plan.cells] == [{"test_weight": 0.5}, {"test_weight": 1.0}]
        line = grid_fields(plan, plan.cells[0], cell_fields(plan.cells[0], None), True)
        assert line["X Type"] == "Test weight"
    finally:
        del KIND_REGISTRY["test_weight"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"clip_skips": [0]}, "--clip-skip 0"),
        ({"subseed_strengths": [1.5]}, "--var-strength 1.5"),
        ({"vaes": [Path("/nonexistent/v.safetensors")]}, "--vae /nonexistent/v.safetensors: no such file"),
        ({"schedulers": ["polyexponential"]}, "--scheduler 'polyexponential': unknown schedule type"),
        ({"samplers": ["euler_a"], "schedulers": ["karras"]}, "--scheduler karras: diffusers' Euler"),
        ({"prompt_order": [("owl",)]}, "--prompt-order: 'owl' is not in the prompt"),
    ],
)
def test_bad_new_axis_values_name_their_flag(tmp_path, kw, message):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    with pytest.raises(WorkbenchError, match="^" + re.escape(message)):
        make_plan(GridRequest(checkpoints=[a], prompts=["p"], seeds=[1], **kw))


CHILD = """
import atexit, resource, runpy, sys, time
start = time.process_time()
def report():
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stderr.write(f"\\nWB-MEASURE {rss_kb} {time.process_time() - start:.3f}\\n")
atexit.register(report)
sys.argv = ["wb", *sys.argv[1:]]
runpy.run_module("workbench.cli", run_name="__main__")
"""


def run_measured(files, *args):
    """(exit code, output lines, peak RSS in MB, seconds) of `wb grid ... --dry-run` in a fresh process."""
    import os
    import subprocess
    import sys

    ckpt, prompts = files
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = ["grid", "--ckpts", str(ckpt), "--prompts", str(prompts), *args, "--dry-run"]
    cmd = [sys.executable, "-c", CHILD, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    measure = re.search(r"WB-MEASURE (\d+) ([\d.]+)", proc.stderr)
    lines = (proc.stdout + proc.stderr.replace(measure[0], "")).strip().splitlines()
    return proc.returncode, lines, int(measure[1]) / 1024, float(measure[2])


def test_huge_axes_in_a_subprocess_one_line_bounded_memory_and_time(files):
    # The baseline is the same command with one seed: wb's start-up (torch is imported by the CLI)
    # is not what is measured; what the huge axis adds on top of it is.
    code, _, base_rss, base_s = run_measured(files, "--seeds", "1")
    assert code == 0
    for flag, text in (("--seeds", "1-10 [100000000]"), ("--seeds", "1-1000000000"),
                       ("--cfg", "1-2 (+0.00000001)")):  # fmt: skip
        code, lines, rss, seconds = run_measured(files, flag, text)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], lines
        # 10^8 seeds in a Python list would be several GB and take seconds.
        assert rss - base_rss < 50 and seconds - base_s < 0.5, (flag, rss, base_rss, seconds, base_s)


def test_size_axis_centres_smaller_cells_in_the_largest_box(tmp_path):
    from PIL import Image

    from workbench.grids import layout

    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    plan = make_plan(GridRequest(checkpoints=[a], prompts=["p"], seeds=[1], sizes=[(64, 32), (32, 64)]))
    assert plan.axes["x"].kind == "size" and plan.axes["x"].labels == ["Size: 64x32", "Size: 32x64"]
    assert [(c.width, c.height) for c in plan.cells] == [(64, 32), (32, 64)]
    geo = plan.geometry
    assert (geo.cell_w, geo.cell_h) == (64, 64)
    assert cell_fields(plan.cells[1], None)["Size"] == "32x64"
    red, blue = Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (32, 64), (0, 0, 255))
    canvas = layout.draw_grid({(0, 0, 0): red, (1, 0, 0): blue}, geo)
    left, top, _, _ = geo.cell_box(0, 0, 0)
    white = (255, 255, 255)
    assert canvas.getpixel((left, top + 16)) == (255, 0, 0) and canvas.getpixel((left, top)) == white
    left, top, _, _ = geo.cell_box(1, 0, 0)
    assert canvas.getpixel((left + 16, top)) == (0, 0, 255) and canvas.getpixel((left, top)) == white
    with pytest.raises(WorkbenchError, match=r"^--size 30x64: the width must be a multiple of 8"):
        make_plan(GridRequest(checkpoints=[a], prompts=["p"], seeds=[1], sizes=[(64, 64), (30, 64)]))
