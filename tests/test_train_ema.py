"""EMA of the trained weights: the update rule against a hand computation, the swap in and out,
and a toy run whose -ema checkpoint equals the average of the per-step checkpoints."""

import json

import pytest
import torch

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.ema import ema_decay_at, ema_start, ema_update, ema_weights
from workbench.train.recipe import parse_recipe
from workbench.train.runs import read_metrics


def test_update_rule_with_warmup_by_hand():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ema_start({"unet": [p]}, decay=0.5, every=2)
    with torch.no_grad():
        p.fill_(1.0)
    assert not ema_update(ema, 1)  # step 1 is not one of every 2
    assert torch.equal(ema.shadows["unet"][0], torch.zeros(3))
    assert ema_update(ema, 2)
    # first update: d = min(0.5, 1/10) = 0.1 -> shadow = 0 + 0.9 * (1 - 0)
    assert torch.allclose(ema.shadows["unet"][0], torch.full((3,), 0.9))
    with torch.no_grad():
        p.fill_(2.0)
    ema_update(ema, 4)
    # second: d = min(0.5, 2/11) = 2/11 -> shadow = 0.9 + (9/11) * (2 - 0.9)
    assert torch.allclose(ema.shadows["unet"][0], torch.full((3,), 0.9 + 9 / 11 * 1.1))
    assert ema_decay_at(0.5, 100) == 0.5 and ema.updates == 2


def test_ema_weights_swaps_in_and_puts_back_bit_for_bit():
    p = torch.nn.Parameter(torch.randn(5))
    original = p.detach().clone()
    ema = ema_start({"unet": [p]}, decay=0.9)
    ema.shadows["unet"][0].fill_(7.0)
    with ema_weights(ema):
        assert torch.equal(p.detach(), torch.full((5,), 7.0))
    assert torch.equal(p.detach(), original)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=11)


def tensors(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt}


def test_the_ema_checkpoint_is_the_average_of_the_steps(base, tmp_path):
    decay = 0.6
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 8, "seed": 2}},
        "validation": {"split": 0.25, "every_n_steps": 2, "every_n_epochs": None, "stabilize_train": False},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "training": {"max_steps": 4, "batch_size": 2, "ema_decay": decay},
        "saving": {"every_n_epochs": None, "every_n_steps": 1, "dtype": "fp32", "ema": "both"},
        "logging": {"tensorboard": False},
    }
    result = loop.train(parse_recipe(raw, "test"), tmp_path / "run")
    assert [p.name for p in result.ema_checkpoints] == [f"run-ep0{1 + (s - 1) // 3}-gs0000{s}-ema.safetensors"
                                                        for s in (1, 2, 3, 4)]  # fmt: skip
    steps = [tensors(base)] + [tensors(p) for p in result.checkpoints]  # weights after step 0..4
    expected = {k: v.float() for k, v in steps[0].items()}
    for t in range(4):  # update t (0-based) follows step t + 1
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: v + (1 - d) * (steps[t + 1][k].float() - v) for k, v in expected.items()}
    ema = tensors(result.ema_checkpoints[-1])
    moved = [k for k in ema if not torch.equal(steps[0][k], steps[-1][k])]
    assert moved and all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in moved)
    for k in ema:
        if ema[k].is_floating_point():
            assert torch.allclose(ema[k], expected[k], atol=1e-6), k
    assert not torch.equal(ema[moved[0]], steps[-1][moved[0]])  # the average is not the last step
    val_ema = [m["loss/val_ema"] for m in read_metrics(result.run_dir) if "loss/val_ema" in m]
    assert len(val_ema) == 3  # at steps 0, 2 and 4, beside loss/val
    with open_checkpoint(result.ema_checkpoints[-1]) as ckpt:
        assert "(EMA)" in ckpt.metadata["modelspec.title"]
        assert '"ema": {"decay": 0.6, "updates": 4}' in ckpt.metadata["wb.train"]


def test_strength_target_sets_the_decay_from_the_run_length(base, tmp_path):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 4, "seed": 2}},
        "validation": {"enabled": False},
        "training": {"max_steps": 4, "batch_size": 2, "ema_strength_target": 0.1, "ema_every_n_steps": 2},
        "saving": {"every_n_epochs": None, "ema": "ema"},
        "logging": {"tensorboard": False},
    }
    result = loop.train(parse_recipe(raw, "test"), tmp_path / "run")
    assert result.checkpoints == [] and len(result.ema_checkpoints) == 1  # saving.ema: ema only
    with open_checkpoint(result.ema_checkpoints[0]) as ckpt:
        record = json.loads(ckpt.metadata["wb.train"])
    # 4 steps, an update every 2: 0.1 ** (2 / 4); two updates were made
    assert record["ema"] == {"decay": pytest.approx(0.1**0.5), "updates": 2}
    with pytest.raises(WorkbenchError, match="ema_strength_target: set ema_decay or ema_strength_target"):
        parse_recipe({**raw, "training": {**raw["training"], "ema_decay": 0.9}}, "test")
