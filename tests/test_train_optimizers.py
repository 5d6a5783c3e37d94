"""Every optimizer takes real steps on the toy model and moves only what it should."""

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.train import loop, setup
from workbench.train.data import CaptionedImages, collate, load_examples
from workbench.train.diffusion import Models, noise_scheduler_for
from workbench.train.optimizers import OPTIMIZERS, adapted_lr, build_optimizer, optimizer_spec
from workbench.train.recipe import parse_recipe

FREEZE = {"unfreeze_last_n_layers": 1, "freeze_embeddings": True, "freeze_final_layer_norm": True}


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=3)


def make_recipe(optimizer: dict, text_encoder: dict | None = None):
    return parse_recipe(
        {
            "model": {"base": "unused"},
            "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 4, "seed": 2}},
            "optimizer": optimizer,
            "text_encoder": text_encoder or {},
            "training": {"max_steps": 2, "batch_size": 2},
        },
        "test",
    )


def fresh_models(toy_path) -> Models:
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.pipeline import load_modules, model_spec
    from workbench.tokenizer import clip_tokenizer

    with open_checkpoint(toy_path) as ckpt:
        spec = model_spec(ckpt)
        m = load_modules(ckpt, spec=spec)
    return Models(
        m["unet"],
        m["text_encoder"],
        m["vae"],
        clip_tokenizer(),
        noise_scheduler_for(spec.configs["scheduler"]),
        0.18215,
    )


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def take_steps(recipe, models, n=2):
    """n optimizer steps of the loop's own loss on one toy batch; returns the optimizers."""
    params = setup.set_trainable(models, recipe)
    optimizers = {c: build_optimizer(recipe.optimizer.settings(c), params[c]) for c in params}
    batch = collate([CaptionedImages(load_examples(recipe.data), recipe.data)[i] for i in range(2)])
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        loss = loop._batch_loss(models, batch, g, recipe, "cpu").mean()
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()
    return optimizers


def changed(before, after, keys):
    return [k for k in keys if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_and_moves_only_unfrozen_weights(name, toy_path, capsys):
    spec = optimizer_spec(name)
    lr = 1.0 if spec.adaptive else 1e-4
    recipe = make_recipe({"name": name, "lr": lr, "text_encoder": {"lr": lr / 2}}, FREEZE)
    models = fresh_models(toy_path)
    before = {c: snapshot(getattr(models, c)) for c in ("unet", "text_encoder", "vae")}
    optimizers = take_steps(recipe, models)
    after = {c: snapshot(getattr(models, c)) for c in ("unet", "text_encoder", "vae")}

    assert changed(before["unet"], after["unet"], before["unet"]), f"{name} did not move the UNet"
    te_keys = list(before["text_encoder"])
    last = [k for k in te_keys if k.startswith("encoder.layers.4.")]
    frozen = [k for k in te_keys if k not in last]
    assert any(k.startswith("embeddings.") for k in frozen) and any("final_layer_norm" in k for k in frozen)
    assert changed(before["text_encoder"], after["text_encoder"], frozen) == []  # bit-identical
    assert changed(before["text_encoder"], after["text_encoder"], last), f"{name} did not move the last layer"
    assert changed(before["vae"], after["vae"], before["vae"]) == []

    for component, opt in optimizers.items():
        dlr = adapted_lr(opt)
        if spec.adaptive:  # the step actually taken: d * lr, per component
            assert dlr is not None and 0 < dlr < float("inf"), (name, component, dlr)
        else:
            assert dlr is None
    # D-Adaptation's log_every and Prodigy's constructor print to the console; wb keeps it quiet
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["adamw", "dadapt_adam", "prodigy"])
def test_text_encoder_lr_zero_leaves_it_unchanged(name, toy_path):
    lr = 1.0 if optimizer_spec(name).adaptive else 1e-4
    recipe = make_recipe({"name": name, "lr": lr, "weight_decay": 0.5, "text_encoder": {"lr": 0}})
    models = fresh_models(toy_path)
    before = snapshot(models.text_encoder)
    optimizers = take_steps(recipe, models)
    assert set(optimizers) == {"unet"}  # a zero lr: frozen, no optimizer (and no weight decay)
    after = snapshot(models.text_encoder)
    assert changed(before, after, before) == []
    assert not any(p.requires_grad for p in models.text_encoder.parameters())


def test_each_component_gets_its_own_settings(toy_path):
    recipe = make_recipe(
        {
            "name": "adamw",
            "lr": 1e-4,
            "betas": [0.8, 0.9],
            "weight_decay": 0.1,
            "text_encoder": {"name": "lion", "lr": 3e-5, "weight_decay": 0.0},
        }
    )
    models = fresh_models(toy_path)
    params = setup.set_trainable(models, recipe)
    unet = build_optimizer(recipe.optimizer.settings("unet"), params["unet"])
    te = build_optimizer(recipe.optimizer.settings("text_encoder"), params["text_encoder"])
    assert type(unet).__name__ == "AdamW" and type(te).__name__ == "Lion"
    g_unet, g_te = unet.param_groups[0], te.param_groups[0]
    assert (g_unet["lr"], g_unet["betas"], g_unet["weight_decay"]) == (1e-4, (0.8, 0.9), 0.1)
    assert (g_te["lr"], g_te["betas"], g_te["weight_decay"]) == (3e-5, (0.8, 0.9), 0.0)


def test_unknown_optimizer_lists_the_valid_ones():
    valid = "adamw, adamw8bit, lion, lion8bit, dadapt_adam, dadapt_lion, dadapt_sgd, prodigy"
    with pytest.raises(ValueError, match=f"unknown optimizer 'adam8bit'; valid: {valid}$"):
        optimizer_spec("adam8bit")


def test_a_failing_8bit_optimizer_is_named(monkeypatch):
    import bitsandbytes as bnb

    class Broken(torch.optim.SGD):
        def __init__(self, params, lr=1e-3, **kw):
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Broken)
    recipe = make_recipe({"name": "adamw8bit", "lr": 1e-4})
    with pytest.raises(
        WorkbenchError, match="optimizer adamw8bit: bitsandbytes' 8-bit optimizer does not run on cpu"
    ):
        build_optimizer(recipe.optimizer.settings("unet"), [torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizers_on_cuda(name):
    params = [torch.nn.Parameter(torch.randn(4096, device="cuda"))]
    recipe = make_recipe({"name": name, "lr": 1e-3})
    opt = build_optimizer(recipe.optimizer.settings("unet"), params)
    before = params[0].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(before, params[0].detach())
    assert opt.state[params[0]]["state1"].dtype == torch.uint8
