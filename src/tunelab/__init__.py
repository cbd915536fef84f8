"""tunelab: advanced fine-tuning of transformer language models and the experiments that compare them.

This module is a leaf (it imports nothing), so any module may import its constants without a circle.
"""

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""Label value that Hugging Face losses and tunelab's metrics skip (prompt tokens, padding, sub-words)."""
