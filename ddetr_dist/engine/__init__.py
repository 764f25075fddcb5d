"""The per-worker train loop, evaluation, checkpoints and TensorBoard logging."""
