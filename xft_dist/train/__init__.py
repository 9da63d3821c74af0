"""Training: model and engine from the config, the optimizer step, and the run loop."""
