"""Training engine: fit loop, evaluation, teacher provider + cache, checkpoints, logging."""
