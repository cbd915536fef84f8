"""Adapter methods: (IA)³, bottleneck adapters (Houlsby / Pfeiffer), Compacter, AdapterDrop.

Imports nothing: each module is imported by name (``from tunelab.tuners.adapters import ia3``).
"""
