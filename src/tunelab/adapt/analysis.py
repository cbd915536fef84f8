"""Analyses over finished result files: the cross-domain transfer matrix (train on i, test on j).

A stage-free grid ``grid.params: {data.domain: [general, medical, legal, technical]}`` with the
``domain_kd`` objective (``kd_weight: 0`` is plain fine-tuning) and ``probe_domains`` listing every
domain gives, per cell, the in-domain ``score`` and ``<domain>/score`` on the other domains' test data
(the same tasks). :func:`transfer_matrices` arranges them as T[i][j] = score of the model fine-tuned on
domain i, tested on domain j (mean over seeds), one matrix per method label.
"""

from __future__ import annotations

import statistics
from collections import defaultdict


def transfer_matrices(results: list[dict]) -> dict[str, tuple[list[str], list[str], list[list[float | None]]]]:
    """``{method label: (trained-on domains, tested-on domains, T)}`` from stage-free results with probes."""
    cells: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        if result.get("stage_matrix"):
            continue
        domain = (result.get("config") or {}).get("data", {}).get("domain")
        probes = {k.removesuffix("/score"): v for k, v in result.get("metrics", {}).items()
                  if k.endswith("/score") and "/" not in k.removesuffix("/score")}
        probes = {k: v for k, v in probes.items() if k in _DOMAIN_NAMES or k == domain}
        if not isinstance(domain, str) or not probes:
            continue
        probes.setdefault(domain, result["metrics"]["score"])
        probes[domain] = result["metrics"]["score"]
        for tested, value in probes.items():
            cells[result["method_label"]][(domain, tested)].append(value)
    matrices = {}
    for label, values in cells.items():
        trained = sorted({i for i, _ in values}, key=_order)
        tested = sorted({j for _, j in values}, key=_order)
        if len(trained) < 2:
            continue
        matrices[label] = (trained, tested, [[statistics.fmean(values[(i, j)]) if (i, j) in values else None
                                              for j in tested] for i in trained])
    return matrices


_DOMAIN_NAMES = ("general", "medical", "legal", "technical")


def _order(name: str) -> tuple[int, str]:
    return (_DOMAIN_NAMES.index(name) if name in _DOMAIN_NAMES else len(_DOMAIN_NAMES), name)
