"""Report section: efficiency per method and size — memory in training and inference (mean / p99 / max),
latency with the adapters unmerged and merged, adapter size on disk (:mod:`tunelab.experiments.efficiency`).

Cells sharing a method label and a training size are averaged over seeds (each figure's mean over the
cells that have it); a dash is a figure the cells do not have (a method that cannot merge, a run with
``eval.latency_batches: 0``, results written before these figures existed).
"""

from __future__ import annotations

from collections import defaultdict

from tunelab.experiments.plots import mean_or_none


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def rows(results: list[dict]) -> list[dict]:
    """One row per (method label, train size) with the seed-mean of every efficiency figure."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for result in results:
        if result.get("efficiency"):
            groups[(result["method_label"], result["train_size"])].append(result["efficiency"])
    out = []
    for (label, size), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        row = {"method": label, "train_size": size, "seeds": len(group),
               "source": group[0].get("memory_source", "rss")}
        for phase in ("train", "inference"):
            for stat in ("mean", "p99", "max"):
                row[f"{phase}_{stat}"] = mean_or_none([(e.get(f"{phase}_memory_mb") or {}).get(stat) for e in group])
        for key in ("latency_ms_unmerged", "latency_ms_merged", "adapter_mb"):
            row[key] = mean_or_none([e.get(key) for e in group])
        out.append(row)
    return out


def markdown_section(results: list[dict]) -> str:
    """``## Efficiency: memory, latency merged / unmerged, adapter size``; empty without such results."""
    table = rows(results)
    if not table:
        return ""
    source = {"cuda_reserved": "CUDA reserved memory", "rss": "the process's resident memory (RSS)"}
    what = " / ".join(sorted({source.get(r["source"], r["source"]) for r in table}))
    lines = ["## Efficiency: memory, latency merged / unmerged, adapter size", "",
             f"Memory is {what}, sampled every 50 ms while the cell trains and while it is evaluated "
             "(test set and latency): mean, 99th percentile (nearest rank) and maximum in MiB. Latency is "
             "the median forward time over 8 test prompts with the adapters as trained (unmerged) and "
             "folded into the base weights (merged; – where the method cannot merge). Adapter: the saved "
             "adapter in tunelab's format, MiB. Mean over seeds.", "",
             "| method | train size | seeds | train mem mean / p99 / max | inference mem mean / p99 / max | "
             "latency unmerged (ms) | latency merged (ms) | adapter (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        train = " / ".join(_fmt(r[f"train_{s}"], ".0f") for s in ("mean", "p99", "max"))
        infer = " / ".join(_fmt(r[f"inference_{s}"], ".0f") for s in ("mean", "p99", "max"))
        lines.append(f"| {r['method']} | {r['train_size']} | {r['seeds']} | {train} | {infer} | "
                     f"{_fmt(r['latency_ms_unmerged'], '.1f')} | {_fmt(r['latency_ms_merged'], '.1f')} | "
                     f"{_fmt(r['adapter_mb'], '.3f')} |")
    return "\n".join(lines) + "\n\n"
