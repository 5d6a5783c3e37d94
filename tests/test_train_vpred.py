"""v-prediction training (SD2 768-v style): the loss target and Min-SNR weight by hand, and a toy
v-prediction run whose checkpoints stay v-prediction for every sampler that reads them."""

import torch

from workbench.checkpoint.reader import open_checkpoint
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.train import loop
from workbench.train.recipe import parse_recipe


def v_toy(path):
    from workbench.toy.model import toy_init

    plain = toy_init(path.with_name("eps.safetensors"), seed=2)
    with open_checkpoint(plain) as ckpt:
        tensors, metadata = {k: ckpt[k].clone() for k in ckpt}, dict(ckpt.metadata)
    return save_tensors(path, tensors, {**metadata, "modelspec.prediction_type": "v"})


def test_v_target_and_min_snr_weight_by_hand(tmp_path):
    from workbench.pipeline import load_modules, model_spec
    from workbench.tokenizer import clip_tokenizer
    from workbench.train.diffusion import Models, denoising_loss, noise_scheduler_for

    path = v_toy(tmp_path / "v.safetensors")
    with open_checkpoint(path) as ckpt:
        spec = model_spec(ckpt)
        m = load_modules(ckpt, spec=spec)
    scheduler = noise_scheduler_for(spec.configs["scheduler"])
    assert scheduler.config.prediction_type == "v_prediction"
    models = Models(m["unet"], m["text_encoder"], m["vae"], clip_tokenizer(), scheduler, 1.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ids, t = torch.zeros(3, 77, dtype=torch.long), torch.tensor([10, 500, 990])
    with torch.no_grad():
        loss = denoising_loss(models, x0, ids, noise, t)
        weighted = denoising_loss(models, x0, ids, noise, t, min_snr_gamma=5.0)
        a = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = models.unet(noisy, t, models.text_encoder(ids)[0]).sample
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(loss, ((pred - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)
    snr = (a / (1 - a)).flatten()
    assert torch.allclose(weighted, loss * torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)


def test_a_v_prediction_run_saves_v_prediction_checkpoints(tmp_path):
    from workbench.pipeline import build_pipeline

    raw = {
        "model": {"base": str(v_toy(tmp_path / "v.safetensors"))},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 4, "seed": 1}},
        "validation": {"split": 0.25, "every_n_epochs": None, "stabilize_train": False},
        "training": {"max_steps": 2, "batch_size": 2, "min_snr_gamma": 5.0},
        "saving": {"every_n_epochs": None},
        "logging": {"tensorboard": False},
    }
    result = loop.train(parse_recipe(raw, "test"), tmp_path / "run")
    assert result.stopped is None and len(result.val_losses) == 2
    with open_checkpoint(result.checkpoints[-1]) as ckpt:
        assert ckpt.metadata["modelspec.prediction_type"] == "v"
    assert build_pipeline(result.checkpoints[-1]).scheduler.config.prediction_type == "v_prediction"
