"""Prompt learning: prompt tuning, prefix tuning, P-Tuning v2 (and their PEFT files); CoOp, VPT, MaPLe on CLIP.

Imports nothing: each module is imported by name (``from tunelab.tuners.prompts import prefix``).
"""
