"""Held-out preference metrics of every alignment cell's model before and after each stage.

The runner scores a stage's test data only after that stage (``eval.cross_stages: previous``), so its
report has no "before DPO" row. This script reloads each cell's saved adapters
(``adapters/<run>/adapter.safetensors`` holds the SFT ``default`` adapter and the ``preference`` and
``grpo`` adapters stacked on it) and scores the preference stage's 100 held-out pairs with the SFT
adapter alone, then with the preference adapter, then with the GRPO adapter too: how often the model
puts more log-probability on the chosen (correct) answer, and how often greedy decoding produces it.

Usage: ``TUNELAB_HOME=... python docs/studies/alignment/before_after.py RUN_DIR [OUT.json]``
"""

import glob
import json
import sys
from pathlib import Path

import torch

from tunelab import tuners
from tunelab.align.logps import evaluate_preferences
from tunelab.experiments import registry
from tunelab.experiments.preflight import stage_splits
from tunelab.experiments.spec import resolve_stages, validate
from tunelab.models import zoo

torch.set_num_threads(1)
run = Path(sys.argv[1])
out = {}
for path in sorted(glob.glob(str(run / "adapters" / "*" / "adapter.safetensors"))):
    cell = Path(path).parent.name
    result = json.loads((run / "results" / f"{cell}.json").read_text())
    stages = resolve_stages(validate(result["config"], cell))
    preference = next(s for s in stages if s.name == "preference")
    _, (_, _, test, labels) = stage_splits(preference)
    model, tokenizer = zoo.load(result["config"]["model"]["name"])
    model = tuners.load(model, Path(path).parent)
    pairs = registry.build_objective("dpo", {"reference": "sft_adapter"})  # the paired collator, for KTO cells too
    pairs.collator(tokenizer, labels, max_length=preference.data.max_length, template=preference.data.template)
    rows = {}
    for active in (["default"], ["default", "preference"], ["default", "preference", "grpo"]):
        tuners.set_active(model, active)
        rows["+".join(active)] = metrics = evaluate_preferences(
            model, tokenizer, test, pairs.collate_fn, reference=None, template=preference.data.template,
            generate=True, max_new_tokens=24, batch_size=16)
        print(cell, active, {k: round(v, 3) for k, v in metrics.items()}, flush=True)
    out[cell] = rows
Path(sys.argv[2] if len(sys.argv) > 2 else run / "before_after.json").write_text(json.dumps(out, indent=1))
