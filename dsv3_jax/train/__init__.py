"""Training: losses, optimizer, data, checkpointing and the train loop."""
