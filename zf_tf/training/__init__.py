"""Training: strategies, the training loop (`train`), evaluation, export, callbacks, and the
workdir (its config, checkpoints and who writes it). Imports no analysis."""
