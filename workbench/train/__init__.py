"""wb train: recipe-driven Stable Diffusion fine-tuning (see docs/train.md)."""
