"""Component swaps: build a checkpoint from the UNet of one, the text encoder of another, ..."""
