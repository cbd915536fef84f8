"""Report section: every cell next to its baselines, the sizes it used, its flags and a few predictions.

A score means little alone: a 9-class task at 0.924 accuracy may be exactly its majority rate. So each
cell is shown with the untrained model's score on the same test split, the majority-class accuracy and
macro-F1 (classification), the data sizes actually used (and asked for, when they differ), the flags
the runner raised (``below_untuned``, ``empty_outputs``) and its first sample predictions.
"""

from __future__ import annotations


def _number(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _macro_f1(metrics: dict):
    """``macro_f1``, or the one task's ``<task>/macro_f1`` (generative ``choice`` records)."""
    if "macro_f1" in metrics:
        return metrics["macro_f1"]
    per_task = [value for key, value in metrics.items() if key.endswith("/macro_f1")]
    return per_task[0] if len(per_task) == 1 else None


def markdown_section(results: list[dict]) -> str:
    """``## Baselines and checks`` for result files that carry baselines (older ones are skipped)."""
    rows = [r for r in results if "baselines" in r]
    if not rows:
        return ""
    lines = ["## Baselines and checks", "",
             "Untuned = the model before training on the same test split; majority = always the most frequent "
             "training label. Sizes are those actually used (asked-for size in parentheses when it could not be met).",
             "", "| run | train / val / test | score | macro-F1 | untuned | majority acc / macro-F1 | flags |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sizes = r.get("data_sizes", {})
        train = f"{sizes.get('train', '?')}"
        if sizes.get("train_requested") not in (None, sizes.get("train")):
            train += f" ({sizes['train_requested']})"
        majority = r["baselines"].get("majority_class")
        untuned = r["baselines"].get("untuned") or {}
        lines.append(f"| {r['run_id']} | {train} / {sizes.get('validation', '?')} / {sizes.get('test', '?')} | "
                     f"{_number(r['metrics'].get('score'))} | {_number(_macro_f1(r['metrics']))} | "
                     f"{_number(untuned.get('score'))} | "
                     + (f"{majority['accuracy']:.4f} / {majority['macro_f1']:.4f}" if majority else "–")
                     + f" | {'**' + '; '.join(r.get('flags', [])) + '**' if r.get('flags') else 'ok'} |")
    lines += ["", "### Sample predictions", ""]
    for r in rows:
        lines.append(f"**{r['run_id']}**")
        lines.append("")
        for sample in r.get("sample_predictions", []):
            shown = {k: v for k, v in sample.items() if k in ("prompt", "text", "reference", "prediction")}
            lines.append("- " + " · ".join(f"{k}: `{str(v).replace('`', chr(39))[:160]!s}`" for k, v in shown.items()))
        lines.append("")
    return "\n".join(lines) + "\n"
