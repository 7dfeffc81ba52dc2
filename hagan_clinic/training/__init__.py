"""Training HA-GAN: losses, the four-phase loop, training-state checkpoints, distributed helpers."""
