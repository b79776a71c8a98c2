"""Training: state, optimizer and freezing, the loop, checkpoints, metrics."""
