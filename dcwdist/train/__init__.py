"""Training: stages, optimizer, checkpoints, logging and the trainer loop."""
