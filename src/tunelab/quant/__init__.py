"""tunelab.quant."""
