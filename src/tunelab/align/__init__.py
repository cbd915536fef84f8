"""tunelab.align."""
