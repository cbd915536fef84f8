"""tunelab.distill."""
