"""tunelab.adapt."""
