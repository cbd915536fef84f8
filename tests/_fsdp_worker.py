"""Worker for tests/test_fsdp_cpu.py: LoRA on a tiny random Llama sharded with FSDP2 (``fully_shard``) on CPU.

    python _fsdp_worker.py OUT.safetensors                                   # one process, no sharding
    python -m torch.distributed.run --standalone --nproc_per_node 2 _fsdp_worker.py OUT.safetensors

Accelerate (1.15) enables FSDP only on accelerators (its CPU state is MULTI_CPU = DDP), so this worker
shards with torch's ``fully_shard`` directly: every decoder layer, then the root. Each rank trains on its
strided half of the same 4-record batch; the adapter is gathered from the shards with
:func:`tunelab.train.engine.trainable_state` (what the loop's checkpoint calls on every rank).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import build_model, build_records, collate  # noqa: E402

from tunelab.train import engine  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    sharded = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    model = build_model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    records = build_records(16, seed=3)
    model.train()
    for step in range(4):
        batch = collate(records[4 * step : 4 * step + 4][rank::world])  # this rank's share of the global batch
        model(**batch).loss.backward()  # FSDP2 reduce-scatters the mean gradient over the ranks
        optimizer.step()
        optimizer.zero_grad()
    state = engine.trainable_state(model)  # every rank: gathers the shards
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[1])
    if sharded:
        # A rank sometimes aborted at exit ("terminate called without an active exception", ~1 run in 8 on
        # a loaded machine): gloo's worker threads can still hold async work whose tensors are freed during
        # interpreter finalization, when the GIL can no longer be taken. So: free the sharded model and
        # its pending work while Python is alive, tear the group down, and skip finalization with
        # os._exit once the output is on disk (rank 0's file is closed by save_file above).
        del model, optimizer, state
        gc.collect()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
