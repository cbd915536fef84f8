"""Real domain data from ``../shared/data`` as domains for the same configs.

MedQuAD (cancer.gov consumer health Q&A, JSONL ``question``/``answer``) and LegalBench CUAD clause
classification (TSV ``label``/``text``) load directly through the data section (``data.source: <file>``;
the column aliases map them to generation and classification records). PubMedQA's labelled file (a
single JSON object keyed by PMID) loads directly too, with the ``pubmedqa`` format
(:mod:`tunelab.data.formats.pubmedqa`: question + abstract contexts → ``yes``/``no``/``maybe``);
:func:`pubmedqa_records` is that reader, and :func:`prepare` writes every set as JSON Lines::

    python -m tunelab.adapt.real ../shared/data runs/real-domains
    # data: {source: runs/real-domains/pubmedqa.jsonl}          (sft with smollm2-135m / tiny-llama)
    # data: {source: runs/real-domains/cuad_governing_law.jsonl} (classification with minilm)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = {
    "medquad": ("domain/medical/medquad_cancergov.jsonl", "medical"),
    "cuad_governing_law": ("domain/legal/legalbench_cuad_governing_law_test.tsv", "legal"),
    "cuad_license_grant": ("domain/legal/legalbench_cuad_license_grant_test.tsv", "legal"),
}
PUBMEDQA = "domain/medical/pubmedqa_ori_pqal.json"


def pubmedqa_records(path: str | Path, max_context_words: int = 120) -> list[dict]:
    """PubMedQA-L rows as records with ``label`` = ``final_decision`` and a prompt/response.

    Kept for existing callers: the reader is :func:`tunelab.data.formats.pubmedqa_records` (format
    ``pubmedqa``, ``choice`` records), and ``data.source`` may point at the PubMedQA file directly.
    """
    from tunelab.data.formats import pubmedqa_records as read

    return read(path, max_context_words=max_context_words)


def prepare(shared_data: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write every real domain set as JSONL records (with ``domain`` and ``task``) under ``out_dir``."""
    from tunelab.data import formats

    shared_data, out_dir = Path(shared_data), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    sets = {"pubmedqa": pubmedqa_records(shared_data / PUBMEDQA)}
    for name, (relative, domain) in FILES.items():
        sets[name] = [{**r, "domain": domain, "task": name} for r in formats.load_records(shared_data / relative)]
    for name, records in sets.items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        written[name] = path
    return written


if __name__ == "__main__":
    for name, path in prepare(sys.argv[1], sys.argv[2]).items():
        print(f"{name}: {path}")
