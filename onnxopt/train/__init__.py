"""Recovering accuracy after a rewrite: calibration activations and refit (calibrate), training hooks and
external trainers (hooks)."""
