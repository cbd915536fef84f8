"""Turn the ``data`` section of an experiment into train / validation / test records."""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.errors import ConfigError, DataError
from tunelab.experiments.spec import DataSpec


def build_splits(data: DataSpec, label_key: str | None = None
                 ) -> tuple[list[dict], list[dict], list[dict], list[str] | None]:
    """Return ``(train, validation, test, label_names)``.

    ``label_key`` is the record field the objective reads labels from (``label``, ``ner_tags``; its
    ``label_key``); label_names is None for generation (``label_key=None``).
    """
    if data.source == "synthetic":
        train, validation, test = _synthetic_splits(data)
    else:
        train, validation, test = _file_splits(data)
    if not train:
        raise DataError("the training split is empty; increase data.train_size or check the data file")
    labels = _label_names(data, label_key, train + validation + test)
    return train, validation, test, labels


def _synthetic_splits(data: DataSpec) -> tuple[list[dict], list[dict], list[dict]]:
    from tunelab.data import synthetic

    unknown = [task for task in data.tasks if task not in synthetic.TASKS]
    if unknown:
        raise ConfigError(f"data.tasks: unknown built-in task {unknown[0]!r}; choose from: {', '.join(synthetic.TASKS)}")
    splits = []
    for split, size in (("train", data.train_size), ("validation", data.eval_size), ("test", data.test_size)):
        records: list[dict] = []
        for task in data.tasks:
            if size:
                records += synthetic.make_task(task, domain=data.domain, split=split, n=size, seed=data.seed)
        random.Random(f"{data.seed}-{split}").shuffle(records)
        splits.append(records)
    return splits[0], splits[1], splits[2]


def _file_splits(data: DataSpec) -> tuple[list[dict], list[dict], list[dict]]:
    from tunelab.data import formats

    source = data.source
    if not source.startswith("hf:") and not Path(source).exists():
        raise DataError(f"data file not found: {source} (data.source takes 'synthetic', a file path or hf:NAME)")
    fmt = "hf" if source.startswith("hf:") else data.format
    records = formats.load_records(source.removeprefix("hf:"), format=fmt, columns=data.columns)
    random.Random(data.seed).shuffle(records)
    if data.test_source:
        test = formats.load_records(data.test_source, format=data.format, columns=data.columns)[: data.test_size]
    else:
        test, records = records[: data.test_size], records[data.test_size :]
    validation, records = records[: data.eval_size], records[data.eval_size :]
    return records[: data.train_size], validation, test


def _label_names(data: DataSpec, key: str | None, records: list[dict]) -> list[str] | None:
    if key is None:
        return None
    if data.source == "synthetic":
        from tunelab.data import synthetic

        if len(data.tasks) != 1:
            raise ConfigError("a classification objective needs exactly one task in data.tasks (one label set)")
        return list(synthetic.label_names(data.tasks[0]))
    missing = [i for i, record in enumerate(records) if key not in record]
    if missing:
        raise DataError(f"the objective needs a '{key}' field; record {missing[0]} has keys "
                        f"{sorted(records[missing[0]])} (map it with data.columns)")
    if key == "label":
        return sorted({str(record["label"]) for record in records})
    return sorted({tag for record in records for tag in record["ner_tags"]})
