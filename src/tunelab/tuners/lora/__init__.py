"""The LoRA family: LoRA / rsLoRA, DoRA, QLoRA, LoRA+, multi-LoRA combination, the learned mixture, PEFT files.

Imports nothing: each module is imported by name (``from tunelab.tuners.lora import dora``).
"""
