"""tunelab.multitask."""
