"""tunelab.data: records for training — the built-in synthetic world, real formats and collators.

All data becomes a list of plain ``dict`` records (schema in docs/internals.md). ``synthetic`` renders
a seeded world into tasks of every kind; ``formats`` loads real data sets; ``collate`` batches records.
"""
