"""wb merge: methods against hand-computed references, the engine's semantics, metadata and ancestry.

Checkpoints are tiny but use the real SD1 single-file (LDM) key names, an int64 position_ids, EMA
and scheduler buffers, so every rule about components, blocks and integer tensors is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from workbench.checkpoint import safetensors_io
from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.errors import WorkbenchError
from workbench.merge import engine, methods
from workbench.merge.blocks import block_names, block_of
from workbench.merge.engine import merge, plan_merge
from workbench.merge.provenance import ancestry_tree, render_ancestry
from workbench.merge.recipe import Input, Recipe, Step, single_step, validate

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
POS = TE + "embeddings.position_ids"
CONV_IN = U + "input_blocks.0.0.weight"

# One key per interesting place: blocks IN00, IN01, IN04, IN11, M00, OUT00, OUT11 and the final out.
IN04 = U + "input_blocks.4.0.in_layers.2.weight"
M00 = U + "middle_block.1.proj_out.weight"
OUT11 = U + "output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight"
FINAL_OUT = U + "out.2.weight"
TIME_EMBED = U + "time_embed.0.weight"
TE_KEY = TE + "encoder.layers.0.self_attn.q_proj.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def sd1_tensors(
    seed: int = 0, dtype=torch.float16, in_ch: int = 4, width: int = 8
) -> dict[str, torch.Tensor]:
    """A tiny SD1-layout state dict with real key names (random values, seeded)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    w = width
    return {
        TIME_EMBED: r(4 * w, w),
        CONV_IN: r(w, in_ch, 3, 3),
        U + "input_blocks.0.0.bias": r(w),
        U + "input_blocks.1.1.proj_in.weight": r(w, w, 1, 1),
        IN04: r(w, w, 3, 3),
        U + "input_blocks.11.0.out_layers.3.weight": r(w, w, 3, 3),
        M00: r(w, w, 1, 1),
        U + "output_blocks.0.0.skip_connection.weight": r(w, 2 * w, 1, 1),
        OUT11: r(w, w),
        U + "out.0.bias": r(w),
        FINAL_OUT: r(4, w, 3, 3),
        POS: torch.arange(77, dtype=torch.int64)[None],
        TE + "embeddings.token_embedding.weight": r(300, w),
        TE_KEY: r(w, w),
        TE + "final_layer_norm.weight": r(w),
        VAE_KEY: r(w, 4, 3, 3),
        "first_stage_model.encoder.conv_out.bias": r(8),
        "model_ema.decay": torch.tensor(0.9999, dtype=torch.float32),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelout2weight": r(4, w, 3, 3),
        "alphas_cumprod": torch.linspace(0.99, 0.01, 1000, dtype=torch.float32),
    }


def make_sd1(path, seed=0, drop=(), extra=None, **kw):
    tensors = sd1_tensors(seed, **kw)
    for k in drop:
        tensors.pop(k)
    tensors.update(extra or {})
    return save_tensors(path, tensors)


@pytest.fixture
def abc(tmp_path):
    return [make_sd1(tmp_path / f"{n}.safetensors", seed=i + 1) for i, n in enumerate("abc")]


def f32(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k].float() if ck[k].is_floating_point() else ck[k].clone() for k in ck}


def read(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k].clone() for k in ck}


def is_merged_component(key: str) -> bool:
    # A1111's key set: every key whose name contains "model" (UNet, text encoder, VAE, EMA), but the
    # text encoder's position_ids and the integer tensors.
    return "model" in key and key not in (POS, "model_ema.num_updates")


def run(method, paths, out, params, dtype="fp32", threads=2, **kw):
    return merge(single_step(method, paths, params, dtype=dtype, **kw), out, threads=threads)


# ---------------------------------------------------------------------------------------------------
# each method against its hand-written reference, exact with fp32 output


REFERENCES = {
    "weighted": (2, {"alpha": 0.3}, lambda a, b, p: (1 - p["alpha"]) * a + p["alpha"] * b),
    "add-diff": (3, {"alpha": 0.7}, lambda a, b, c, p: a + p["alpha"] * (b - c)),
    "triple-sum": (
        3,
        {"alpha": 0.2, "beta": 0.45},
        lambda a, b, c, p: (1 - p["alpha"] - p["beta"]) * a + p["alpha"] * b + p["beta"] * c,
    ),
    "sum-twice": (
        3,
        {"alpha": 0.25, "beta": 0.6},
        lambda a, b, c, p: (1 - p["beta"]) * ((1 - p["alpha"]) * a + p["alpha"] * b) + p["beta"] * c,
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_elementwise_methods_match_the_formula_exactly(tmp_path, abc, name, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 100)  # several chunks per tensor: chunk edges must not show
    n, params, ref = REFERENCES[name]
    out = tmp_path / "out.safetensors"
    run(name, abc[:n], out, params)
    got, ins = f32(out), [f32(p) for p in abc[:n]]
    for key, t in got.items():
        if is_merged_component(key):
            assert torch.equal(t, ref(*(i[key] for i in ins), params)), key
        elif t.is_floating_point():
            assert torch.equal(t, ins[0][key]), key  # scheduler buffers: copied from A


def test_weighted_alpha_is_the_share_of_b(tmp_path, abc):
    run("weighted", abc[:2], tmp_path / "one.safetensors", {"alpha": 1.0})
    run("weighted", abc[:2], tmp_path / "zero.safetensors", {"alpha": 0.0})
    one, zero, a, b = (
        f32(tmp_path / "one.safetensors"),
        f32(tmp_path / "zero.safetensors"),
        f32(abc[0]),
        f32(abc[1]),
    )
    assert torch.equal(one[IN04], b[IN04]) and torch.equal(zero[IN04], a[IN04])


def test_slerp_matches_the_spherical_formula(tmp_path, abc):
    out = tmp_path / "s.safetensors"
    run("slerp", abc[:2], out, {"alpha": 0.3})
    got, a, b = f32(out), f32(abc[0]), f32(abc[1])
    for key in (IN04, TE_KEY, OUT11):
        x, y = a[key].double().flatten(), b[key].double().flatten()
        omega = math.acos((x @ y / (x.norm() * y.norm())).item())
        want = (math.sin(0.7 * omega) * x + math.sin(0.3 * omega) * y) / math.sin(omega)
        # float32 dot products and norms: equal to the float64 formula up to rounding
        torch.testing.assert_close(got[key].double().flatten(), want, rtol=1e-5, atol=1e-6)


def test_slerp_of_parallel_tensors_is_the_weighted_sum():
    a = torch.tensor([1.0, 2.0, 3.0])
    got = methods.slerp(a.clone(), 2 * a, alpha=0.25)
    assert torch.equal(got, 0.75 * a + 0.25 * (2 * a))


def test_ties_by_hand():
    base = torch.zeros(4)
    m1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    m2 = torch.tensor([-1.0, -1.0, 2.0, 0.1])
    # density 0.5 keeps the 2 largest magnitudes: m1 -> [0, -2, 3, 0]; m2 -> [-1, -1, 2, 0] (a tie at 1
    # keeps both). Elected signs of the sum [-1, -3, 5, 0]: [-, -, +, 0]. Disjoint means: position 0
    # only m2 agrees (-1); position 1: (-2 - 1) / 2; position 2: (3 + 2) / 2; position 3: nothing.
    got = methods.ties(base.clone(), m1.clone(), m2.clone(), density=0.5, lam=1.0)
    assert torch.equal(got, torch.tensor([-1.0, -1.5, 2.5, 0.0]))
    got = methods.ties(base + 1, m1 + 1, m2 + 1, density=0.5, lam=0.5)  # deltas against the base
    assert torch.equal(got, 1 + 0.5 * torch.tensor([-1.0, -1.5, 2.5, 0.0]))


def test_ties_through_the_engine(tmp_path, abc):
    out = tmp_path / "t.safetensors"
    run("ties", abc, out, {"density": 0.3, "lambda": 0.8})
    got, ins = f32(out), [f32(p) for p in abc]
    for key in (IN04, TE_KEY, FINAL_OUT):
        want = methods.ties(*(i[key].clone() for i in ins), density=0.3, lam=0.8)
        assert torch.equal(got[key], want)


def test_dare_by_hand(tmp_path, abc):
    base, m = torch.zeros(10_000), torch.ones(10_000)
    assert torch.equal(
        methods.dare(base.clone(), m.clone(), drop=0.0, lam=0.5, generator=torch.Generator()),
        torch.full((10_000,), 0.5),
    )
    got = methods.dare(base.clone(), m.clone(), drop=0.75, lam=1.0, generator=methods.key_generator(3, "k"))
    kept = got != 0
    assert set(got[kept].tolist()) == {4.0}  # survivors rescaled by 1 / (1 - 0.75)
    assert abs(kept.float().mean().item() - 0.25) < 0.02

    out = tmp_path / "d.safetensors"
    run("dare", abc, out, {"drop": 0.6, "lambda": 0.9, "seed": 7})
    got, ins = f32(out), [f32(p) for p in abc]
    for key in (IN04, TE_KEY):
        g = methods.key_generator(7, key)
        base = ins[0][key]
        total = torch.zeros_like(base)
        for m in ins[1:]:
            keep = torch.rand(base.shape, generator=g) >= 0.6
            total += (m[key] - base) * keep / (1 - 0.6)
        assert torch.equal(got[key], base + 0.9 * total)


def test_dare_and_thread_count_do_not_change_a_single_byte(tmp_path, abc):
    one, four = tmp_path / "1.safetensors", tmp_path / "4.safetensors"
    run("dare", abc, one, {"drop": 0.5, "seed": 1}, dtype="fp16", threads=1)
    run("dare", abc, four, {"drop": 0.5, "seed": 1}, dtype="fp16", threads=4)
    x, y = read(one), read(four)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------------
# components, blocks, dtypes


def test_per_component_alphas(tmp_path, abc):
    out = tmp_path / "c.safetensors"
    run("weighted", abc[:2], out, {"alpha": 0.5}, components={"unet": 0.7, "text_encoder": 0.2, "vae": 0.4})
    got, a, b = f32(out), f32(abc[0]), f32(abc[1])
    for key, alpha in ((IN04, 0.7), (TIME_EMBED, 0.7), (TE_KEY, 0.2), (VAE_KEY, 0.4)):
        assert torch.equal(got[key], (1 - alpha) * a[key] + alpha * b[key]), key
    ema = "model_ema.diffusion_modelout2weight"  # no weight of its own: the step's alpha (A1111's keys)
    assert torch.equal(got[ema], 0.5 * a[ema] + 0.5 * b[ema])
    assert torch.equal(got["alphas_cumprod"], a["alphas_cumprod"])
    old = tmp_path / "old.safetensors"
    run("weighted", abc[:2], old, {"alpha": 0.5}, components={"vae": 0.4}, vae_from="A")
    assert torch.equal(f32(old)[ema], a[ema])  # --vae-from A: the EMA is copied from A
    assert torch.equal(f32(old)[VAE_KEY], 0.6 * a[VAE_KEY] + 0.4 * b[VAE_KEY])


def test_block_names():
    assert len(block_names(12)) == 26 and len(block_names(9)) == 20
    assert block_names(12)[:2] == ["BASE", "IN00"] and block_names(9)[-1] == "OUT08"
    assert block_of(IN04, 12) == "IN04" and block_of(M00, 12) == "M00"
    assert block_of(OUT11, 12) == "OUT11" and block_of(FINAL_OUT, 12) == "OUT11"
    assert block_of(FINAL_OUT, 9) == "OUT08"
    assert block_of(TIME_EMBED, 12) == "BASE" and block_of(TE_KEY, 12) == "BASE"


def test_block_weights_put_each_alpha_on_its_keys(tmp_path, abc):
    blocks = [round(0.02 + i * 0.03, 2) for i in range(26)]  # BASE=0.02, IN00=0.05, ... OUT11=0.77
    out = tmp_path / "mbw.safetensors"
    result = run("weighted", abc[:2], out, {"alpha": 0.5}, blocks=blocks)
    got, a, b = f32(out), f32(abc[0]), f32(abc[1])
    names = block_names(12)
    for key, block in (
        (IN04, "IN04"),
        (M00, "M00"),
        (OUT11, "OUT11"),
        (FINAL_OUT, "OUT11"),
        (TIME_EMBED, "BASE"),
        (TE_KEY, "BASE"),
    ):
        alpha = blocks[names.index(block)]
        assert torch.equal(got[key], (1 - alpha) * a[key] + alpha * b[key]), key
    assert torch.equal(got[VAE_KEY], 0.5 * a[VAE_KEY] + 0.5 * b[VAE_KEY])  # the step's own alpha
    recorded = json.loads(result.metadata["wb.merge_recipe"])
    assert recorded["block_names"] == names and "time_embed" in recorded["block_convention"]


def test_block_weights_need_one_value_per_block(tmp_path, abc):
    with pytest.raises(WorkbenchError, match="25 values given.*26"):
        plan_merge(single_step("weighted", abc[:2], {"alpha": 0.5}, blocks=[0.5] * 25), with_hash=False)
    with pytest.raises(WorkbenchError, match="UNet weight and block weights"):
        single_step("weighted", abc[:2], {"alpha": 0.5}, components={"unet": 0.3}, blocks=[0.5] * 26)


@pytest.mark.parametrize(
    "dtype, want", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_output_dtype_and_integer_tensors(tmp_path, abc, dtype, want):
    out = tmp_path / "o.safetensors"
    run("add-diff", abc, out, {"alpha": 0.5}, dtype=dtype)
    got, ins = read(out), [f32(p) for p in abc]
    assert got[IN04].dtype == want and got[VAE_KEY].dtype == want
    assert torch.equal(got[IN04], (ins[0][IN04] + 0.5 * (ins[1][IN04] - ins[2][IN04])).to(want))
    assert got[POS].dtype == torch.int64 and torch.equal(got[POS], torch.arange(77)[None])
    assert got["model_ema.num_updates"].dtype == torch.int32 and got["model_ema.num_updates"].item() == 1000


def test_float_position_ids_are_reset_to_int64_arange(tmp_path):
    bad = torch.arange(77, dtype=torch.float16)[None]
    bad[0, 5] = 4.0  # a cast-and-merged position_ids, as some mergers wrote them
    a = make_sd1(tmp_path / "a.safetensors", 1, extra={POS: bad})
    b = make_sd1(tmp_path / "b.safetensors", 2)
    result = run("weighted", [a, b], tmp_path / "o.safetensors", {"alpha": 0.5})
    got = read(tmp_path / "o.safetensors")[POS]
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(77)[None])
    assert result.position_ids_reset == [POS]


# ---------------------------------------------------------------------------------------------------
# mismatches, refused from the headers


def sdxl_like(path):
    x = torch.zeros
    return save_tensors(
        path,
        {
            U + "label_emb.0.0.weight": x(32, 64, dtype=torch.float16),
            U + "input_blocks.4.0.in_layers.2.weight": x(16, 16, 3, 3, dtype=torch.float16),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": x(
                8, dtype=torch.float16
            ),
            "conditioner.embedders.1.model.ln_final.weight": x(16, dtype=torch.float16),
        },
    )


def test_sd1_with_sdxl_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    a = make_sd1(tmp_path / "a.safetensors", 1)
    b = sdxl_like(tmp_path / "xl.safetensors")

    def no_data(self, key, *rest):
        raise AssertionError(f"tensor data of {key} was read")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "tensor", no_data)
    monkeypatch.setattr(engine._ChunkReader, "read", no_data)
    with pytest.raises(WorkbenchError) as e:
        merge(single_step("weighted", [a, b], {"alpha": 0.5}), tmp_path / "o.safetensors")
    msg = str(e.value)
    assert "sdxl" in msg and "sd1" in msg and "before reading any tensor" in msg and "\n" not in msg
    assert IN04 in msg  # the first key whose shapes differ
    assert not (tmp_path / "o.safetensors").exists()


def test_shape_mismatch_names_the_key_and_both_files(tmp_path, monkeypatch):
    a = make_sd1(tmp_path / "a.safetensors", 1)
    b = make_sd1(tmp_path / "b.safetensors", 2, extra={M00: torch.zeros(8, 4, 1, 1, dtype=torch.float16)})
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "tensor", lambda self, key: pytest.fail("data read"))
    with pytest.raises(WorkbenchError) as e:
        plan_merge(single_step("weighted", [a, b], {"alpha": 0.5}))
    msg = str(e.value)
    assert msg.startswith(M00) and "b.safetensors" in msg and "a.safetensors" in msg and "[8, 4, 1, 1]" in msg


def test_missing_keys_are_copied_from_a_and_extra_keys_dropped(tmp_path):
    a = make_sd1(tmp_path / "a.safetensors", 1)
    extra = "model.diffusion_model.input_blocks.2.0.emb_layers.1.weight"
    b = make_sd1(
        tmp_path / "b.safetensors", 2, drop=[IN04], extra={extra: torch.zeros(4, 4, dtype=torch.float16)}
    )
    out = tmp_path / "o.safetensors"
    result = run("weighted", [a, b], out, {"alpha": 0.5})
    assert result.plan.missing == {IN04: ["B"]} and result.plan.dropped == {extra: ["B"]}
    got = f32(out)
    assert torch.equal(got[IN04], f32(a)[IN04]) and extra not in got


def test_inpainting_a_with_a_normal_b_merges_the_first_four_channels(tmp_path):
    a = make_sd1(tmp_path / "inpaint.safetensors", 1, in_ch=9)
    b = make_sd1(tmp_path / "b.safetensors", 2)
    out = tmp_path / "o.safetensors"
    result = run("weighted", [a, b], out, {"alpha": 0.4})
    assert result.plan.partial == [CONV_IN]
    got, fa, fb = f32(out), f32(a), f32(b)
    assert got[CONV_IN].shape == (8, 9, 3, 3)
    assert torch.equal(got[CONV_IN][:, :4], 0.6 * fa[CONV_IN][:, :4] + 0.4 * fb[CONV_IN])
    assert torch.equal(got[CONV_IN][:, 4:], fa[CONV_IN][:, 4:])
    assert json.loads(result.metadata["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(WorkbenchError, match="inpainting .* must be A"):
        plan_merge(single_step("weighted", [b, a], {"alpha": 0.4}), with_hash=False)


def test_add_diff_into_an_inpainting_model(tmp_path):
    a = make_sd1(tmp_path / "inpaint.safetensors", 1, in_ch=9)
    b, c = (make_sd1(tmp_path / f"{n}.safetensors", s) for n, s in (("b", 2), ("c", 3)))
    out = tmp_path / "o.safetensors"
    run("add-diff", [a, b, c], out, {"alpha": 1.0})
    got, fa, fb, fc = f32(out), f32(a), f32(b), f32(c)
    assert torch.equal(got[CONV_IN][:, :4], fa[CONV_IN][:, :4] + 1.0 * (fb[CONV_IN] - fc[CONV_IN]))
    assert torch.equal(got[CONV_IN][:, 4:], fa[CONV_IN][:, 4:])


def test_the_output_is_never_an_input(tmp_path, abc):
    with pytest.raises(WorkbenchError, match="cannot be one of the inputs"):
        run("weighted", abc[:2], abc[0], {"alpha": 0.5})


# ---------------------------------------------------------------------------------------------------
# interruption


def test_an_interruption_in_the_middle_leaves_no_file(tmp_path, abc, monkeypatch):
    calls = {"n": 0}
    real = methods.weighted_sum

    def flaky(a, b, *, alpha):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # what Ctrl-C raises
        return real(a, b, alpha=alpha)

    monkeypatch.setitem(
        methods.METHODS, "weighted", dataclasses.replace(methods.METHODS["weighted"], fn=flaky)
    )
    for threads in (1, 3):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            run("weighted", abc[:2], tmp_path / "o.safetensors", {"alpha": 0.5}, threads=threads)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "a.safetensors",
            "b.safetensors",
            "c.safetensors",
        ]


# ---------------------------------------------------------------------------------------------------
# metadata and ancestry


def test_metadata_round_trip(tmp_path, abc):
    out = tmp_path / "mix.safetensors"
    result = run("add-diff", abc, out, {"alpha": 0.7}, dtype="fp16")
    meta = open_checkpoint(out).metadata
    assert meta == result.metadata
    assert meta["format"] == "pt" and meta["modelspec.title"] == "mix"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"]
    recipe = json.loads(meta["sd_merge_recipe"])
    shas = [s.sha256 for s in result.plan.sources.values()]
    assert recipe["interp_method"] == "Add difference" and recipe["multiplier"] == 0.7
    assert [
        recipe["primary_model_hash"],
        recipe["secondary_model_hash"],
        recipe["tertiary_model_hash"],
    ] == shas
    assert recipe["save_as_half"] is True
    models = json.loads(meta["sd_merge_models"])
    assert set(models) == set(shas) and models[shas[0]]["name"] == "a.safetensors"
    assert len(models[shas[0]]["legacy_hash"]) == 8
    full = json.loads(meta["wb.merge_recipe"])
    assert [i["sha256"] for i in full["inputs"]] == shas and full["dtype"] == "fp16"
    assert full["steps"][0]["method"] == "add-diff" and full["steps"][0]["params"] == {"alpha": 0.7}


def test_ancestry_folds_in_the_parents_ancestry(tmp_path, abc):
    a, b, c = abc
    first = run("weighted", [a, b], tmp_path / "first.safetensors", {"alpha": 0.5}, dtype="fp16")
    second = run(
        "add-diff",
        [tmp_path / "first.safetensors", c, a],
        tmp_path / "second.safetensors",
        {"alpha": 1.0},
        dtype="fp16",
    )
    sha = {n: s.sha256 for n, s in first.plan.sources.items()} | {
        "first": second.plan.sources["A"].sha256,
        "c": second.plan.sources["B"].sha256,
    }
    meta = open_checkpoint(tmp_path / "second.safetensors").metadata
    models = json.loads(meta["sd_merge_models"])
    assert {sha["A"], sha["B"], sha["first"], sha["c"]} <= set(models)  # a and b came from first's metadata
    assert models[sha["first"]]["sd_merge_recipe"]["interp_method"] == "Weighted sum"

    tree = ancestry_tree(meta)
    assert tree["recipe"]["interp_method"] == "Add difference"
    assert [p["name"] for p in tree["parents"]] == ["first.safetensors", "c.safetensors", "a.safetensors"]
    first_node = tree["parents"][0]
    assert [p["sha256"] for p in first_node["parents"]] == [sha["A"], sha["B"]]
    assert first_node["parents"][0]["parents"] == [] and first_node["parents"][0]["recipe"] is None

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_ancestry(meta))
    text = console.export_text()
    assert "first.safetensors" in text and "Weighted sum" in text and sha["A"][:10] in text
    assert render_ancestry({"format": "pt"}) is None


def test_a_recipe_graph_records_its_steps_in_the_ancestry(tmp_path, abc):
    a, b, c = abc
    recipe = validate(
        Recipe(
            [Input("a", str(a)), Input("b", str(b)), Input("c", str(c))],
            [
                Step("mix", "weighted", ["a", "b"], {"alpha": 0.3}),
                Step("final", "add-diff", ["mix", "c", "a"], {}),
            ],
            "final",
            "fp16",
        ),
        "test",
    )
    result = merge(recipe, tmp_path / "g.safetensors")
    tree = ancestry_tree(result.metadata)
    mix = tree["parents"][0]
    assert mix["name"] == "mix" and mix["sha256"] is None and mix["recipe"]["multiplier"] == 0.3
    assert [p["name"] for p in mix["parents"]] == ["a.safetensors", "b.safetensors"]


# ---------------------------------------------------------------------------------------------------
# the toy model end to end (the issue's acceptance check)


def test_toy_models_add_difference_end_to_end(tmp_path):
    toy = pytest.importorskip("workbench.toy.model")
    a, b, c = (toy.toy_init(tmp_path / f"{n}.safetensors", seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    from typer.testing import CliRunner

    from workbench.merge.cli import merge_app

    out = tmp_path / "d.safetensors"
    res = CliRunner().invoke(
        merge_app, ["add-diff", str(a), str(b), str(c), "--alpha", "0.7", "--dtype", "fp32", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    got, fa, fb, fc = f32(out), f32(a), f32(b), f32(c)
    checked = 0
    for key, t in got.items():
        if key.startswith((U, "cond_stage_model.")) and t.is_floating_point():
            assert torch.equal(t, fa[key] + 0.7 * (fb[key] - fc[key])), key
            checked += 1
    assert checked > 300
    pos = next(k for k in got if k.endswith("position_ids"))
    assert got[pos].dtype == torch.int64 and torch.equal(got[pos].flatten(), torch.arange(77))
    meta = open_checkpoint(out).metadata
    assert json.loads(meta["sd_merge_recipe"]) and json.loads(meta["sd_merge_models"])
    assert meta["wb.architecture"] == "toy" and "wb.diffusers_configs" in meta  # still a loadable toy model


def test_progress_reports_bytes_up_to_the_total(tmp_path, abc):
    seen = []
    recipe = single_step("weighted", abc[:2], {"alpha": 0.5})
    result = merge(
        recipe, tmp_path / "o.safetensors", progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (result.plan.out_bytes, result.plan.out_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == len(result.plan.keys)


@pytest.mark.parametrize("old_side", ["a", "b"])
def test_old_sd1_text_encoder_names_merge_with_current_ones(tmp_path, old_side):
    """Very old SD1 files have the CLIP text model right under cond_stage_model.transformer.; they
    merge key for key with current files, and the output uses the current names."""

    def old_names(tensors):
        return {k.replace(TE, "cond_stage_model.transformer.") if k.startswith(TE) else k: v
                for k, v in tensors.items()}  # fmt: skip

    paths = {}
    for i, side in enumerate("ab"):
        tensors = sd1_tensors(i + 1)
        paths[side] = save_tensors(tmp_path / f"{side}.safetensors",
                                   old_names(tensors) if side == old_side else tensors)  # fmt: skip
    out = tmp_path / "o.safetensors"
    result = run("weighted", [paths["a"], paths["b"]], out, {"alpha": 0.5})
    assert result.plan.missing == {} and result.plan.dropped == {}
    got, a, b = f32(out), sd1_tensors(1), sd1_tensors(2)
    assert torch.allclose(got[TE_KEY], 0.5 * a[TE_KEY].float() + 0.5 * b[TE_KEY].float())
    assert not any(k.startswith("cond_stage_model.transformer.encoder") for k in got)


def test_a_file_with_both_spellings_of_a_key_is_refused(tmp_path):
    tensors = sd1_tensors(1)
    tensors["cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight"] = tensors[TE_KEY]
    bad = save_tensors(tmp_path / "both.safetensors", tensors)
    good = make_sd1(tmp_path / "good.safetensors", 2)
    with pytest.raises(WorkbenchError, match=f"{bad}: both .* are in the checkpoint"):
        run("weighted", [good, bad], tmp_path / "o.safetensors", {"alpha": 0.5})
