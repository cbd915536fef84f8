"""The baselines every result carries, and the flags that say when a tuned model is not better.

- **untuned**: the model before any training (its task head, if any, freshly initialised with the
  model seed) evaluated on the same test split by the same objective. It depends on the model and the
  data, not on the method, so it is computed once per (model, data, objective, eval settings) and
  cached in ``<run_dir>/baselines/<key>.json``.
- **majority class** (classification, ``choice``): always answer the most frequent training label; its accuracy
  on the test split is the floor a classifier must clear, and its macro-F1 is ~1/classes.
- **general probe** (``eval.general_probe``, :mod:`tunelab.eval.probe`): the untuned model's perplexity
  on held-out general-domain text, the *before* of the forgetting probe; it depends on the model and the
  probe only, so it is cached once per run in ``<run_dir>/baselines/general-<key>.json``.
- **flags**: ``below_untuned`` when the tuned score is lower than the untuned one, ``empty_outputs``
  when at least 10% of the generations are empty.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from tunelab.utils import atomic_write_json

EMPTY_SHARE = 0.10  # flag a cell when this share of its generations (or more) is empty
SAMPLES = 3  # sample predictions kept in each result file


def untuned_key(spec, stages) -> str:
    """What the untuned evaluation depends on: model, every stage's data and objective, eval settings."""
    # the general probe has its own cache (general_probe_key): the task baseline does not depend on it
    payload = {"model": spec.model.identity(),
               "eval": spec.eval.model_dump(mode="json", exclude={"general_probe"}),
               "stages": [{"data": s.data.model_dump(mode="json"), "objective": s.objective.model_dump(mode="json")}
                          for s in stages]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_untuned(run_dir: Path, key: str) -> list[dict] | None:
    path = Path(run_dir) / "baselines" / f"{key}.json"
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def store_untuned(run_dir: Path, key: str, metrics: list[dict]) -> None:
    atomic_write_json(Path(run_dir) / "baselines" / f"{key}.json", {"key": key, "metrics": metrics})


def general_probe_key(spec) -> str:
    """What the untuned model's general-probe perplexity depends on: the model, the probe settings, the
    probe file's content and the batch size (padding changes the last bits of float sums)."""
    from tunelab.experiments.grid import file_fingerprint

    probe = spec.eval.general_probe
    payload = {"model": spec.model.identity(), "probe": probe.model_dump(mode="json"),
               "batch_size": spec.eval.batch_size,
               "file": None if probe.source == "synthetic" else file_fingerprint(Path(probe.source))}
    return "general-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_general_probe(run_dir: Path, key: str) -> dict | None:
    """``{"perplexity", "tokens"}`` of the untuned model on the general probe, if a cell measured it already."""
    path = Path(run_dir) / "baselines" / f"{key}.json"
    try:
        return json.loads(path.read_text())["general_probe"]
    except (OSError, ValueError, KeyError):
        return None


def store_general_probe(run_dir: Path, key: str, measured: dict) -> None:
    atomic_write_json(Path(run_dir) / "baselines" / f"{key}.json", {"key": key, "general_probe": measured})


def majority_class(train: list[dict], test: list[dict], label_key: str | None) -> dict | None:
    """Accuracy and macro-F1 of always predicting the most frequent training label (classification, and
    generative ``choice`` records such as PubMedQA's yes / no / maybe under ``sft``)."""
    if label_key is None and train and test and all(r.get("kind") == "choice" and "label" in r for r in train + test):
        label_key = "label"
    if label_key != "label" or not train or not test:
        return None
    from tunelab.eval.tasks import macro_f1

    label = Counter(str(r["label"]) for r in train).most_common(1)[0][0]
    refs = [str(r["label"]) for r in test]
    preds = [label] * len(refs)
    return {"label": label, "accuracy": sum(p == y for p, y in zip(preds, refs, strict=True)) / len(refs),
            "macro_f1": macro_f1(preds, refs)}


def flags(metrics: dict, untuned: dict | None, predictions: list[dict]) -> list[str]:
    """Warnings a reader must see next to the score."""
    found = []
    score, base = metrics.get("score"), (untuned or {}).get("score")
    if score is not None and base is not None and score < base:
        found.append(f"below_untuned ({score:.4f} < {base:.4f})")
    generated = [p.get("prediction") for p in predictions if isinstance(p.get("prediction"), str)]
    if generated:
        empty = sum(not text.strip() for text in generated) / len(generated)
        if empty >= EMPTY_SHARE:
            found.append(f"empty_outputs ({100 * empty:.0f}% of generations)")
    return found


def samples(predictions: list[dict], count: int = SAMPLES) -> list[dict]:
    """The first few predictions, texts shortened to 300 characters."""
    def short(value):
        return value[:300] + "…" if isinstance(value, str) and len(value) > 300 else value

    return [{key: short(value) for key, value in row.items()} for row in predictions[:count]]
