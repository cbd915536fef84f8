"""FSDP2 smoke test on CPU: LoRA on a sharded tiny Llama (2 processes, gloo) equals the unsharded run.

torch 2.13's ``fully_shard`` runs on CPU over gloo; Accelerate 1.15 does not turn FSDP on for CPU
processes (see docs/scale.md), so the worker shards with torch directly. Checked: 4 AdamW steps on the
same global batch give the same adapter within 1e-5, and ``engine.trainable_state`` gathers the full
LoRA matrices from the shards (the checkpoint path of the training loop).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_fsdp_worker.py")


def test_fsdp2_sharded_lora_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "one.safetensors")],
                           stderr=subprocess.PIPE, text=True, env=env)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(WORKER), str(tmp_path / "two.safetensors")], stderr=subprocess.PIPE, text=True, env=env)
    for process in (one, two):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    single, sharded = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert single.keys() == sharded.keys() and any("lora" in name for name in single)
    for name in single:
        assert sharded[name].shape == single[name].shape  # full matrices, not shards
        torch.testing.assert_close(sharded[name], single[name], atol=1e-5, rtol=0)
