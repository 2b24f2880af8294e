"""Training: data, losses, discriminators, the loop, checkpoints and export."""
