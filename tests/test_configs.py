"""The shipped model configs build the real SD architectures: checked by exact parameter counts.

Models are built on the meta device, so a 2.6 B-parameter UNet costs no memory and takes well under a second.
"""

from importlib import resources

import diffusers
import pytest
import torch
import transformers

from workbench.configs import ARCHITECTURES, load_config
from workbench.errors import WorkbenchError

# Parameter counts of the public checkpoints (buffers such as position_ids are not parameters).
PARAMETER_COUNTS = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724,
    ("sd21", "vae"): 83_653_863,
    ("sd21", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H text tower, 23 of its 24 layers
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG text tower + text_projection
}

MODEL_COMPONENTS = sorted(PARAMETER_COUNTS)
ALL_COMPONENTS = [(arch, comp) for arch, comps in ARCHITECTURES.items() for comp in comps]


def _build_on_meta(config: dict) -> torch.nn.Module:
    config = dict(config)
    class_name = config.pop("_class_name")
    with torch.device("meta"):
        if class_name.startswith("CLIPText"):
            return getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
        return getattr(diffusers, class_name).from_config(config)


@pytest.mark.parametrize("arch, component", MODEL_COMPONENTS)
def test_parameter_count(arch, component):
    model = _build_on_meta(load_config(arch, component))
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[(arch, component)]


def test_every_model_component_is_counted():
    models = {(a, c) for a, c in ALL_COMPONENTS if c != "scheduler"}
    assert models == set(PARAMETER_COUNTS)


@pytest.mark.parametrize("arch, component", ALL_COMPONENTS)
def test_no_unknown_keys(arch, component):
    # A misspelt key would be dropped by diffusers (with only a log line) or kept as a stray attribute
    # by transformers; either way the model would silently use a default.
    config = load_config(arch, component)
    class_name = config.pop("_class_name")
    if class_name.startswith("CLIPText"):
        assert config["architectures"] == [class_name]
        unknown = set(config) - set(transformers.CLIPTextConfig().to_dict())
    else:
        _, unknown, _ = getattr(diffusers, class_name).extract_init_dict(config)
    assert not unknown


def test_every_json_file_is_listed():
    root = resources.files("workbench.configs")
    shipped = {
        (folder.name, file.name.removesuffix(".json"))
        for folder in root.iterdir()
        if folder.is_dir() and not folder.name.startswith("__")
        for file in folder.iterdir()
        if file.name.endswith(".json")
    }
    assert shipped == set(ALL_COMPONENTS)


@pytest.mark.parametrize(
    "arch, class_name, prediction_type",
    [
        ("sd15", "PNDMScheduler", "epsilon"),
        ("sd21", "DDIMScheduler", "v_prediction"),
        ("sdxl", "EulerDiscreteScheduler", "epsilon"),
    ],
)
def test_schedulers(arch, class_name, prediction_type):
    config = load_config(arch, "scheduler")
    assert config["_class_name"] == class_name
    scheduler = getattr(diffusers, class_name).from_config(config)
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.steps_offset == 1


def test_architecture_specifics():
    assert load_config("sd15", "vae")["scaling_factor"] == 0.18215
    assert load_config("sd21", "vae")["scaling_factor"] == 0.18215
    sdxl_vae = load_config("sdxl", "vae")
    assert (sdxl_vae["scaling_factor"], sdxl_vae["force_upcast"]) == (0.13025, True)
    assert load_config("sd15", "text_encoder")["hidden_act"] == "quick_gelu"
    assert load_config("sdxl", "text_encoder")["hidden_act"] == "quick_gelu"
    assert load_config("sd21", "text_encoder")["hidden_act"] == "gelu"
    assert load_config("sdxl", "text_encoder_2")["_class_name"] == "CLIPTextModelWithProjection"
    assert load_config("sd21", "unet")["upcast_attention"] is True
    assert load_config("sdxl", "scheduler")["timestep_spacing"] == "leading"
    assert load_config("sd15", "scheduler")["skip_prk_steps"] is True


def test_load_config_returns_a_fresh_dict():
    load_config("sd21", "scheduler")["prediction_type"] = "epsilon"
    assert load_config("sd21", "scheduler")["prediction_type"] == "v_prediction"


@pytest.mark.parametrize(
    "arch, component, message",
    [
        ("sd3", "unet", "unknown architecture 'sd3'"),
        ("sd15", "text_encoder_2", "architecture 'sd15' has no component 'text_encoder_2'"),
        ("sdxl", "tokenizer", "has no component 'tokenizer'"),
    ],
)
def test_unknown_arch_or_component(arch, component, message):
    with pytest.raises(WorkbenchError, match=message):
        load_config(arch, component)
