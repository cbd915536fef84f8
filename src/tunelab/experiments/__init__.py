"""tunelab.experiments."""
