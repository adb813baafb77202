"""Patch sampling, masking, normalisation and the training loop."""
