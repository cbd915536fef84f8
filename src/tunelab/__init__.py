"""tunelab: advanced fine-tuning of transformer language models and the experiments that compare them."""

__version__ = "0.1.0"
