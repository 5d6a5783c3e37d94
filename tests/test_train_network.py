"""wb train with a `network:` section (LoRA / LoCon) on the toy model, CPU: the kohya file (exact key
set, shapes, alpha, metadata, hash), the base frozen, loss falling, diffusers' load_lora_weights
reading the file, EMA, Ctrl-C + resume bit-identical, and the errors of a bad network section."""

import hashlib
import json
import os
import re
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.recipe import load_recipe, parse_recipe
from workbench.train.runs import read_metrics

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# kohya's module selection, written independently of wb's names.py (LORA.md 1.1):
ATTN = re.compile(
    r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.(proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
CONV = re.compile(
    r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut|"
    r"time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
)
TE = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=5)


def recipe(base, **sections):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 12, "seed": 1}},
        "validation": {"split": 0.25, "every_n_epochs": None, "stabilize_train": False},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "network": {"type": "lora", "dim": 4, "alpha": 2},
        "training": {"max_steps": 6, "batch_size": 2},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_recipe(raw, "test")


def lora_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def expected_modules(locon: bool) -> dict[str, tuple[int, ...]]:
    """kohya name -> base weight shape, from the toy's modules and kohya's rules."""
    from workbench.toy.model import toy_components

    models = toy_components()
    out = {}
    for path, m in models["unet"].named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (
            ATTN.fullmatch(path) or (locon and CONV.fullmatch(path))
        ):
            out["lora_unet_" + path.replace(".", "_")] = tuple(m.weight.shape)
    for path, m in models["text_encoder"].named_modules():
        inner = path.removeprefix("text_model.")
        if TE.fullmatch(inner):
            out["lora_te_text_model_" + inner.replace(".", "_")] = tuple(m.weight.shape)
    return out


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    return loop.train(recipe(base), tmp_path_factory.mktemp("lora") / "run")


def test_lora_file_is_kohya_with_exactly_the_expected_keys(lora_run):
    path = lora_run.checkpoints[-1]
    assert re.fullmatch(r"run-ep\d\d-gs00006\.safetensors", path.name)
    tensors, meta = lora_tensors(path)
    modules = expected_modules(locon=False)
    assert len(modules) == 6 * 12 + 5 * 6  # toy: 6 attention blocks x 12 modules, 5 TE layers x 6
    expected_keys = {f"{n}.{s}" for n in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected_keys
    for name, shape in modules.items():
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.dim() == 0 and alpha.item() == 2.0
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert (up.shape[0], down.shape[1]) == shape[:2]  # out, in
        if len(shape) == 4:  # SD1 proj_in/proj_out: 1x1 convs
            assert down.shape[2:] == shape[2:] and up.shape[2:] == (1, 1)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "6"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_output_name"] == "run" and meta["ss_unet_lr"] == "0.003"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()


def test_only_the_lora_trains_and_it_learns(base, lora_run):
    record = json.loads((lora_run.run_dir / "run.json").read_text())
    tensors, _ = lora_tensors(lora_run.checkpoints[-1])
    per_component = {"unet": 0, "text_encoder": 0}
    for k, t in tensors.items():
        if not k.endswith(".alpha"):
            per_component["unet" if k.startswith("lora_unet_") else "text_encoder"] += t.numel()
    for c, n in per_component.items():  # the optimizers hold the adapters and nothing else
        assert record["optimizers"][c]["trained_params"] == n
    assert record["frozen"]["unet"]["trained"] == 0 and record["frozen"]["text_encoder"]["trained"] == 0
    assert record["network"]["modules"] == {"unet": 72, "text_encoder": 30}
    (_, first), (_, last) = lora_run.val_losses[0], lora_run.val_losses[-1]
    assert last < first
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(u.abs().max() > 0 for u in ups)  # every up moved from its zero start


def test_diffusers_load_lora_weights_reads_the_file_exactly(base, lora_run):
    pytest.importorskip("peft")
    from workbench.pipeline import build_pipeline

    path = lora_run.checkpoints[-1]
    tensors, _ = lora_tensors(path)
    pipe = build_pipeline(base)
    comps = ("unet", "text_encoder")
    before = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in comps}
    pipe.load_lora_weights(str(path), adapter_name="t")
    wrapped = sum(hasattr(m, "lora_A") for n in comps for m in getattr(pipe, n).modules())
    assert wrapped == len(expected_modules(locon=False))
    pipe.fuse_lora(lora_scale=0.5, components=["unet", "text_encoder"])
    # W' = W + 0.5 * alpha / r * up @ down, hand-computed for two modules
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    for comp, module, name in (
        ("unet", attn, "lora_unet_" + attn.replace(".", "_")),
        ("text_encoder", "encoder.layers.3.mlp.fc1", "lora_te_text_model_encoder_layers_3_mlp_fc1"),
    ):
        w = before[comp][module + ".weight"]
        delta = tensors[name + ".lora_up.weight"] @ tensors[name + ".lora_down.weight"]
        fused = getattr(pipe, comp).get_submodule(module)
        fused_w = fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight
        torch.testing.assert_close(fused_w, w + 0.5 * (2 / 4) * delta, rtol=0, atol=1e-6)


def test_locon_adds_the_resnet_and_sampler_convs(base, tmp_path):
    r = recipe(base, network={"type": "locon", "dim": 4, "conv_dim": 2, "conv_alpha": 1},
               training={"max_steps": 1}, validation={"enabled": False})  # fmt: skip
    run = loop.train(r, tmp_path / "run")
    tensors, meta = lora_tensors(run.checkpoints[-1])
    modules = expected_modules(locon=True)
    assert {k.split(".")[0] for k in tensors} == set(modules)
    # 3x3 convs get conv_dim / conv_alpha with the base kernel; the 1x1 and Linear ones dim / alpha
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_ema_of_the_lora_weights_is_written_beside(base, tmp_path):
    r = recipe(base, training={"max_steps": 3, "ema_decay": 0.5}, validation={"enabled": False})
    run = loop.train(r, tmp_path / "run")
    model, _ = lora_tensors(run.checkpoints[-1])
    ema, _ = lora_tensors(run.ema_checkpoints[-1])
    assert model.keys() == ema.keys()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert not torch.equal(model[key], ema[key]) and ema[key].abs().max() > 0


def ctrl_c_at(step):
    def progress(p):
        if p.step == step and p.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    return progress


def test_ctrl_c_then_resume_is_bit_identical(base, tmp_path):
    sections = {"network": {"dropout": 0.2}, "optimizer": {"name": "dadapt_adam", "lr": 1.0,
                "text_encoder": {"lr": 0.5}}, "training": {"max_steps": 5, "ema_decay": 0.7}}  # fmt: skip
    straight = loop.train(recipe(base, **sections), tmp_path / "straight")
    run = tmp_path / "run"
    first = loop.train(recipe(base, **sections), run, progress=ctrl_c_at(2))
    assert first.stopped == "interrupted" and first.steps == 2
    resumed = loop.resume_training(run)
    assert resumed.steps == 5
    for a, b in ((straight.checkpoints[-1], resumed.checkpoints[-1]),
                 (straight.ema_checkpoints[-1], resumed.ema_checkpoints[-1])):  # fmt: skip
        ta, tb = lora_tensors(a)[0], lora_tensors(b)[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # D-Adaptation's real step is logged per component
    logged = [m for m in read_metrics(run) if "lr/d*lr/unet" in m]
    assert logged and all(m["lr/d*lr/unet"] is not None for m in logged)
    assert all(m["lr/d*lr/text_encoder"] is not None for m in logged)


def test_resume_with_a_changed_network_section_is_refused(base, tmp_path):
    run = tmp_path / "run"
    loop.train(recipe(base, training={"max_steps": 4}), run, progress=ctrl_c_at(1))
    record = json.loads((run / "run.json").read_text())
    record["recipe"]["network"]["dim"] = 8
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(WorkbenchError, match=r"network: the recipe's network section differs"):
        loop.resume_training(run)


@pytest.mark.parametrize(
    "network, message",
    [
        ({"dim": 0}, r"network\.dim: must be at least 1, got 0"),
        ({"alpha": 0}, r"network\.alpha: must be above 0, got 0"),
        ({"alpha": -1}, r"network\.alpha: must be above 0"),
        ({"conv_dim": 4}, r"network\.conv_dim: only used with type: locon"),
        ({"type": "loha"}, r"network\.type: "),
        ({"targets": ["to_q("]}, r"network\.targets\.0: 'to_q\(' is not a valid regex"),
    ],
)
def test_bad_network_sections_name_the_field(base, network, message):
    with pytest.raises(WorkbenchError, match=message):
        recipe(base, network=network)


def test_a_target_pattern_that_matches_nothing_is_an_error(base, tmp_path):
    r = recipe(base, network={"targets": [r".*attn1\.to_q", r".*\.nonexistent"]})
    with pytest.raises(WorkbenchError, match=r"network\.targets\.1: '\.\*\\\\\.nonexistent' matches no"):
        loop.train(r, tmp_path / "run")


def test_target_patterns_choose_the_modules(base, tmp_path):
    r = recipe(base, network={"targets": [r".*attn[12]\.to_(q|v)"], "train": ["unet"]},
               training={"max_steps": 1}, validation={"enabled": False})  # fmt: skip
    tensors, _ = lora_tensors(loop.train(r, tmp_path / "run").checkpoints[-1])
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == 6 * 2 * 2 and all(re.search(r"attn[12]_to_[qv]$", n) for n in names)


def test_alpha_warning_below_one_eighth():
    from workbench.train.network import alpha_warning
    from workbench.train.recipe import NetworkSection

    assert alpha_warning(NetworkSection(dim=32)) is None
    assert alpha_warning(NetworkSection(dim=32, alpha=4)) is None
    assert "1 / dim 128 = 0.00781" in alpha_warning(NetworkSection(dim=128, alpha=1))


def test_lora_dadapt_recipe_is_seed_002():
    r = load_recipe(RECIPES / "lora_dadapt.yaml")
    assert r.network.type == "lora" and r.network.resolved_alpha == r.network.dim
    unet, te = r.optimizer.settings("unet"), r.optimizer.settings("text_encoder")
    assert (unet.name, unet.lr, te.name, te.lr) == ("dadapt_adam", 1.0, "dadapt_adam", 0.5)
    assert unet.options["decouple"] is True and unet.options["weight_decay"] == 0.02
    assert te.options["decouple"] is True and te.options["weight_decay"] == 0.02
    assert (r.schedule.name, r.schedule.warmup_ratio) == ("constant_with_warmup", 0.1)
    photoreal = load_recipe(RECIPES / "lora_photoreal.yaml")
    assert photoreal.network is not None and photoreal.optimizer.name == "adamw"


def test_lr_find_runs_on_a_lora_recipe(base, tmp_path):
    from workbench.train.lr_find import MIN_POINTS, RangeTest, run_range_test

    test = RangeTest(lr_max=3e-2, steps=MIN_POINTS, val_every=1)
    result, finding = run_range_test(recipe(base, validation={"timesteps": [500]}), test, tmp_path / "lr")
    record = json.loads((tmp_path / "lr" / "run.json").read_text())
    assert record["network"]["modules"] == {"unet": 72, "text_encoder": 30}
    assert not list((tmp_path / "lr").glob("checkpoints/*"))
    lrs = [m["lr/unet"] for m in read_metrics(tmp_path / "lr") if "lr/unet" in m]
    assert lrs[-1] == pytest.approx(3e-2) and len(finding.lrs) >= MIN_POINTS


def test_text_encoder_freezing_options_are_refused_in_a_lora_run(base, tmp_path):
    r = recipe(base, text_encoder={"unfreeze_last_n_layers": 2})
    with pytest.raises(WorkbenchError, match=r"^text_encoder\.unfreeze_last_n_layers: the base is frozen"):
        loop.train(r, tmp_path / "run")
