"""Turn the ``data`` section of an experiment into train / validation / test records.

The split rule (documented in docs/experiments.md § Splits):

- synthetic data: each split is generated on its own (held-out entities for test), ``train_size``,
  ``eval_size`` and ``test_size`` (default 100) records per task and domain;
- a file without ``test_source``: the rows are shuffled with ``data.seed``, then the first
  ``test_size`` (default 100) rows are the test split, the next ``eval_size`` the validation split,
  and the next ``train_size`` the training split;
- with ``test_source``: every row of that file is scored, unless ``test_size`` asks for a sample (a
  seeded random sample, not the first rows); ``source`` gives validation then training rows.

A file's records take their ``domain`` from the file's ``domain`` column, else from ``data.domain``
(``general`` unless the data section that names the file gives one).

When a request cannot be met (fewer rows than asked for) the split is smaller and a one-line note says
so; the sizes actually used are recorded in every result file.
"""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.errors import ConfigError, DataError
from tunelab.experiments.spec import DataSpec

DEFAULT_TEST_SIZE = 100
CORPUS_TASK = "corpus"  # data.tasks: [corpus] = the built-in world's unlabeled domain text (DAPT), records {"text"}


def build_splits(data: DataSpec, label_key: str | None = None, notes: list[str] | None = None
                 ) -> tuple[list[dict], list[dict], list[dict], list[str] | None]:
    """Return ``(train, validation, test, label_names)``.

    ``label_key`` is the record field the objective reads labels from (``label``, ``ner_tags``; its
    ``label_key``); label_names is None for generation (``label_key=None``). One-line notes about
    requests that could not be met are appended to ``notes``.
    """
    notes = notes if notes is not None else []
    if data.source == "synthetic":
        train, validation, test = _synthetic_splits(data)
    else:
        train, validation, test = _file_splits(data, notes)
    if not train:
        raise DataError("the training split is empty; increase data.train_size or check the data file")
    if not test:
        raise DataError("the test split is empty; set data.test_size or data.test_source")
    _check_test_kinds(train, test, data)
    _flag_end_markers(train + validation + test, data, notes)
    labels = _label_names(data, label_key, train + validation + test)
    return train, validation, test, labels


def _corpus_records(data: DataSpec, split: str, size: int) -> list[dict]:
    """The pseudo-task ``corpus``: unlabeled domain documents ``{"text": ...}`` for continued pretraining."""
    from tunelab.data import synthetic

    domain = data.domain if isinstance(data.domain, str) else "mixed"
    documents = synthetic.corpus(domains=data.domain, n_documents=size, seed=data.seed, split=split)
    return [{"id": f"corpus-{domain}-{split}-{i}", "task": CORPUS_TASK, "domain": domain, "kind": "text", "text": text}
            for i, text in enumerate(documents)]


def _synthetic_splits(data: DataSpec) -> tuple[list[dict], list[dict], list[dict]]:
    from tunelab.data import synthetic

    unknown = [task for task in data.tasks if task not in (*synthetic.TASKS, CORPUS_TASK)]
    if unknown:
        raise ConfigError(f"data.tasks: unknown built-in task {unknown[0]!r}; choose from: "
                          f"{', '.join(synthetic.TASKS)}, {CORPUS_TASK}")
    splits = []
    test_size = data.test_size or DEFAULT_TEST_SIZE
    for split, size in (("train", data.train_size), ("validation", data.eval_size), ("test", test_size)):
        records: list[dict] = []
        for task in data.tasks:
            if size:
                records += (_corpus_records(data, split, size) if task == CORPUS_TASK else
                            synthetic.make_task(task, domain=data.domain, split=split, n=size, seed=data.seed))
        random.Random(f"{data.seed}-{split}").shuffle(records)
        splits.append(records)
    return splits[0], splits[1], splits[2]


def _file_splits(data: DataSpec, notes: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    from tunelab.data import formats

    source = data.source
    if not source.startswith("hf:") and not Path(source).exists():
        raise DataError(f"data file not found: {source} (data.source takes 'synthetic', a file path or hf:NAME)")
    fmt = "hf" if source.startswith("hf:") else data.format
    domain = _file_domain(data)
    records = formats.load_records(source.removeprefix("hf:"), format=fmt, columns=data.columns, domain=domain)
    total = len(records)
    random.Random(data.seed).shuffle(records)
    if data.test_source:
        if not Path(data.test_source).exists():
            raise DataError(f"test file not found: {data.test_source} (data.test_source)")
        test = formats.load_records(data.test_source, format=data.format, columns=data.test_columns or data.columns,
                                    domain=domain)
        if data.test_size is not None:
            if data.test_size < len(test):
                test = random.Random(f"{data.seed}-test").sample(test, data.test_size)
            else:
                notes.append(f"data.test_size={data.test_size} but {data.test_source} has {len(test)} rows; "
                             f"scoring all {len(test)}")
    else:
        test_size = data.test_size or DEFAULT_TEST_SIZE
        test, records = records[:test_size], records[test_size:]
        if len(test) < test_size:
            notes.append(f"data: {source} has {total} rows, fewer than test_size={test_size}; the test split has "
                         f"{len(test)} and nothing is left for training")
    validation, records = records[: data.eval_size], records[data.eval_size :]
    train = records[: data.train_size]
    if len(train) < data.train_size:
        taken = total - len(records)  # rows that went to the test and validation splits
        notes.append(f"data: asked for {data.train_size} training rows but {source} has {total} rows and {taken} "
                     f"went to the test/validation splits first; training on {len(train)} "
                     "(lower data.test_size or data.eval_size, or use data.test_source)")
    return train, validation, test


def _file_domain(data: DataSpec) -> str:
    """The domain of a file's rows that have no ``domain`` column: ``data.domain``, one name."""
    if not isinstance(data.domain, str) or data.domain == "all":
        raise ConfigError(f"data.domain: a data file's rows take one domain name, not {data.domain!r}; give one "
                          "name, or a `domain` column in the file (or one per file in a task manifest)")
    return data.domain


def _check_test_kinds(train: list[dict], test: list[dict], data: DataSpec) -> None:
    """Test records must be of a kind the training records have (a preference test file under SFT, ...)."""
    train_kinds = {str(r.get("kind", "generation")) for r in train}
    test_kinds = {str(r.get("kind", "generation")) for r in test}
    if not test_kinds <= train_kinds:
        where = data.test_source or data.source
        raise DataError(f"the test data ({where}) holds {', '.join(sorted(test_kinds - train_kinds))} records but "
                        f"training has only {', '.join(sorted(train_kinds))}; map its columns alike (data.test_columns)")


END_MARKERS = ("###eos_token###", "<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>")


def _flag_end_markers(records: list[dict], data: DataSpec, notes: list[str]) -> None:
    """Literal end-of-text markers inside the text (Dolly's ``###eos_token###``) train the model to print them."""
    for record in records:
        for key in ("prompt", "response", "text", "chosen", "rejected"):
            value = record.get(key)
            if isinstance(value, str):
                marker = next((m for m in END_MARKERS if m in value), None)
                if marker is not None:
                    notes.append(f"data: record {record.get('id', '?')} has a literal {marker!r} in its {key}; the model "
                                 "learns to print it (strip it from the data)")
                    return


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
