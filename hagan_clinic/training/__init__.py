"""Training HA-GAN: the loss object (losses), what a run updates (build), the four-phase loop (loop), training-state
files (state) and several processes under torchrun (distributed)."""
