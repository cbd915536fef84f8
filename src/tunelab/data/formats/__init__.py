"""Loaders for real data formats: every file becomes a list of canonical records.

The idea: one reader per *container* (JSON list / JSON Lines, CSV / TSV, a Hugging Face dataset; any
of the files may be gzipped) yields raw rows with their location (``FILE line N``, ``FILE item N``),
and one converter per *format* maps a raw row to the canonical records of ``docs/internals.md``:

============  ===============================================  ==========================
format        raw row                                          record kind
============  ===============================================  ==========================
alpaca        instruction, input, output                       generation
dolly         instruction, context, response, category         generation
oasst         message tree (or the flat oasst1 message table)  chat, one per root-to-leaf
                                                               path ending in an assistant
sharegpt      conversations[{from, value}] (+ chosen/rejected) chat (preference)
hh_rlhf       chosen / rejected full transcripts               preference
jsonl/csv/tsv any columns, mapped with ``columns=``            generation, classification,
                                                               preference, ner or chat
hf            a Hugging Face dataset, converted as above        (by its columns)
pubmedqa      a JSON object keyed by PMID (QUESTION, CONTEXTS,  choice (yes / no / maybe)
              final_decision); detected from that shape
============  ===============================================  ==========================

Any malformed row raises :class:`~tunelab.errors.DataError` naming the file, the line (or list item)
and the problem, never a traceback. ``docs/formats.md`` has the full mapping.

Submodules (this package re-exports their public names; import from ``tunelab.data.formats``):

- ``load``: :func:`load_records`, :func:`guess_format`, choosing and dispatching to a converter;
- ``files``: opening (gzipped) files and the JSON / JSON Lines / CSV / TSV / Hugging Face readers;
- ``instruction``: Alpaca and Dolly;
- ``chat``: ShareGPT and OASST message trees;
- ``preference``: HH-RLHF and preference records;
- ``mapped``: column-mapped generic rows (jsonl / csv / tsv), column aliases, record kinds, NER;
- ``messages``: turns -> canonical messages, transcripts and chat records;
- ``nlp``: CoNLL, SQuAD and multi-task manifests; ``pubmedqa``: PubMedQA's keyed object;
- ``common``: the located row, :class:`RowError` and the row-by-row converter helpers.
"""

from __future__ import annotations

from tunelab.data.formats.common import Row, RowError
from tunelab.data.formats.load import FORMATS, MAPPED_FORMATS, guess_format, load_records
from tunelab.data.formats.mapped import COLUMN_ALIASES, KIND_KEYS
from tunelab.data.formats.messages import ROLES
from tunelab.data.formats.preference import ASSISTANT, HUMAN
from tunelab.data.formats.pubmedqa import is_pubmedqa, pubmedqa_records
from tunelab.data.templates import render_prompt

__all__ = [
    "ASSISTANT",
    "COLUMN_ALIASES",
    "FORMATS",
    "HUMAN",
    "KIND_KEYS",
    "MAPPED_FORMATS",
    "ROLES",
    "Row",
    "RowError",
    "guess_format",
    "is_pubmedqa",
    "load_records",
    "pubmedqa_records",
    "render_prompt",
]
