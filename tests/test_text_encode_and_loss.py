"""clip skip (A1111 units, EveryDream2's number) and the Huber losses, against references built by
hand: a text model with its last layer removed, and the formulas on a few numbers."""

import copy

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.text_encode import encode_with_clip_skip
from workbench.train.diffusion import elementwise_loss
from workbench.train.ema import ema_start, ema_update


@pytest.fixture(scope="module")
def text_encoder():
    from workbench.toy.model import toy_components

    return toy_components(0)["text_encoder"].eval()


def _layers(model):
    return getattr(model, "text_model", model).encoder


def test_clip_skip_1_and_0_are_the_normal_output(text_encoder):
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 4])
    with torch.no_grad():
        normal = text_encoder(ids)[0]
        assert torch.equal(encode_with_clip_skip(text_encoder, ids, 1), normal)
        assert torch.equal(encode_with_clip_skip(text_encoder, ids, 0), normal)


def test_clip_skip_2_is_the_model_without_its_last_layer(text_encoder):
    """Penultimate hidden state through the final layer norm = the output of the same text model
    with its last encoder layer removed."""
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 4])
    shorter = copy.deepcopy(text_encoder)
    encoder = _layers(shorter)
    encoder.layers = encoder.layers[:-1]
    with torch.no_grad():
        want = shorter(ids)[0]
        got = encode_with_clip_skip(text_encoder, ids, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, text_encoder(ids)[0])
    with pytest.raises(WorkbenchError, match="has only 5 layers"):
        encode_with_clip_skip(text_encoder, ids, 99)


class _Sched:
    class config:  # noqa: N801 - mimics a diffusers scheduler's config attribute
        num_train_timesteps = 1000


def test_huber_and_mse_huber_by_hand():
    pred = torch.tensor([0.0, 0.5, 3.0]).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
    target = torch.zeros_like(pred)
    t = torch.tensor([250, 900])
    # MSE: 0, 0.25, 9. Huber (delta 1): 0.5 x^2 below 1, |x| - 0.5 above: 0, 0.125, 2.5
    mse, huber = [0.0, 0.25, 9.0], [0.0, 0.125, 2.5]
    got = elementwise_loss(pred, target, t, "huber", _Sched)
    assert got[0].flatten().tolist() == huber
    got = elementwise_loss(pred, target, t, "mse_huber", _Sched)  # MSE x t/1000 + Huber x (1 - t/1000)
    for row, w in ((0, 0.25), (1, 0.9)):
        want = [m * w + h * (1 - w) for m, h in zip(mse, huber, strict=True)]
        assert got[row].flatten().tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    got = elementwise_loss(pred, target, t, "huber_mse", _Sched)
    want = [h * 0.9 + m * 0.1 for m, h in zip(mse, huber, strict=True)]
    assert got[1].flatten().tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert elementwise_loss(pred, target, t, "mse", _Sched)[0].flatten().tolist() == mse


def test_ema_without_warmup_uses_the_full_decay_from_the_first_update():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = ema_start({"unet": [p]}, decay=0.9, every=2, warmup=False)
    with torch.no_grad():
        p.fill_(2.0)
    assert not ema_update(ema, 1)  # only every 2nd step
    assert ema_update(ema, 2)
    assert ema.shadows["unet"][0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)  # ED2: no warm-up


def test_each_component_clips_its_own_gradient_norm(tmp_path):
    """unet.clip_grad_norm clips the UNet alone: at a norm of 1e-12 AdamW's eps (1e-8) swamps the
    UNet's step, while the text encoder, unclipped, takes a full one."""
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.toy.model import toy_init
    from workbench.train import loop
    from workbench.train.recipe import parse_recipe

    base = toy_init(tmp_path / "base.safetensors", seed=5)
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 4, "seed": 1}},
        "validation": {"enabled": False},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "unet": {"clip_grad_norm": 1e-12},
        "training": {"max_steps": 1, "batch_size": 2},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    result = loop.train(parse_recipe(raw, "test"), tmp_path / "run")

    def moved(prefix):
        with open_checkpoint(result.checkpoints[-1]) as after, open_checkpoint(base) as before:
            return max(
                float((after[k].float() - before[k].float()).abs().max())
                for k in after
                if k.startswith(prefix)
            )

    unet, te = moved("model.diffusion_model."), moved("cond_stage_model.")
    assert te > 1e-4 and unet < 1e-3 * te, (unet, te)


def test_kohya_pseudo_huber_and_smooth_l1_by_hand():
    import math

    class Sched:
        alphas_cumprod = torch.tensor([0.8, 0.5, 0.2, 0.1])

        class config:  # noqa: N801
            num_train_timesteps = 4

    pred = torch.tensor([0.5, -2.0]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    target = torch.zeros_like(pred)
    t = torch.tensor([1, 3])
    # constant: c = 0.1 x scale 2 = 0.2 for both examples
    got = elementwise_loss(pred, target, t, "pseudo_huber", Sched, (0.1, "constant", 2.0))
    want = [2 * 0.2 * (math.sqrt(d * d + 0.04) - 0.2) for d in (0.5, -2.0)]
    assert got[0].flatten().tolist() == pytest.approx(want, rel=1e-6)
    got = elementwise_loss(pred, target, t, "smooth_l1", Sched, (0.1, "constant", 2.0))
    assert got[1].flatten().tolist() == pytest.approx([w / 0.2 for w in want], rel=1e-6)
    # snr: c = (1 - 0.1) / (1 + sqrt((1 - a) / a))^2 + 0.1, a = alphas_cumprod[t]
    for row, a in ((0, 0.5), (1, 0.1)):
        c = 0.9 / (1 + math.sqrt((1 - a) / a)) ** 2 + 0.1
        got = elementwise_loss(pred, target, t, "pseudo_huber", Sched, (0.1, "snr", 1.0))
        want = [2 * c * (math.sqrt(d * d + c * c) - c) for d in (0.5, -2.0)]
        assert got[row].flatten().tolist() == pytest.approx(want, rel=1e-6)
    # exponential: c = scale x exp(ln(0.1) t / T)
    c = math.exp(math.log(0.1) * 3 / 4)
    got = elementwise_loss(pred, target, t, "smooth_l1", Sched, (0.1, "exponential", 1.0))
    assert got[1].flatten().tolist() == pytest.approx(
        [2 * (math.sqrt(d * d + c * c) - c) for d in (0.5, -2.0)]
    )
