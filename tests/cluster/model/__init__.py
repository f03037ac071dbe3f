"""The model: parity with transformers, checkpoints, FP8, devices and dtypes, K/V dtypes, images, training."""
