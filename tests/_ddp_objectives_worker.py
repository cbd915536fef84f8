"""Worker for tests/test_ddp_objectives.py and benchmarks/ddp_objectives.py: every registered objective, one launch.

    python _ddp_objectives_worker.py OUT --batch-size 4                   # the reference: one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        _ddp_objectives_worker.py OUT --batch-size 2                      # two DDP processes (gloo, CPU)

In one launch (the start-up is paid once) the worker loops over ``registry.objectives()`` and the
:data:`VARIANTS` — a newly registered objective without a case in :data:`CASES` (both in
``_ddp_objective_cases.py``) is recorded as an error, so the test fails for it by name — and for each builds a tiny random model (the runner's
``apply_method``: LoRA r=4 on q/v, a task head in ``modules_to_save``), the objective with its usual
options (and the earlier-stage state it expects: a replay buffer, a Fisher, a snapshot, finished
adapters), and a handful of records from the built-in world, then trains 2 optimizer steps with the
real :func:`tunelab.train.train` (global batch 4: ``--batch-size`` is per process) and a final rank-0
evaluation. The models are written once, by rank 0, to ``OUT/.models``; caches go to ``OUT/.home``.

Records are chosen so that every row of a batch scores the same number of tokens (see :func:`uniform`):
then each rank's token-mean loss weighs its tokens exactly as one process does, and the 2-process curve
must equal the 1-process one up to fp32 summation order. Dropout is zero.

Each rank writes ``OUT/<objective>/rank-<r>.json`` — the logged loss per step (mean over ranks), the final
eval loss, a sha256 of the trainable tensors (model + the objective's modules) after setup and after
every step, a digest of the objective's state, and the identity of the teachers / reference tensors
(``frozen``: storage addresses, value sum and device at the first step and after the last, and how
often ``.to`` was called on a teacher module in between) — and ``rank-<r>.safetensors``, the final
trainable tensors. An objective that fails records its one-line error (under DDP the launch then stops:
the other rank may be waiting in a collective); ``--only a,b`` runs a subset. :func:`compare` reads two
launches' files for the test and the benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# the cases (SETUPS and STEPS are re-exported for the test and the benchmark)
from _ddp_objective_cases import CASES, GLOBAL_BATCH, SETUPS, STEPS, VARIANTS, Context, shared_context  # noqa: F401
from safetensors.torch import load_file, save_file
from torch import nn

# ----------------------------------------------------------------------------- tolerances (1 vs 2 processes)
EXACT = 1e-5
EXACT_REASON = ("every row of a batch scores the same number of tokens, so the mean of the ranks' token means is "
                "the one-process mean; only fp32 summation order differs")
PARAMS = 1e-4
PARAMS_REASON = ("AdamW divides by sqrt(v): a parameter whose gradient is still tiny (a LoRA A right after its B "
                 "left zero) turns summation-order noise into steps of up to ~1e-5 in two steps")
#: objectives whose 2-process run legitimately differs from the 1-process one: (loss tolerance or None, why)
TOLERANCES: dict[str, tuple[float | None, str]] = {
    "kto": (1e-3, "KTO's reference point z0 is a batch statistic over mismatched pairs, which each process forms "
                  "from its own rows (TRL does the same); its mean over processes equals the one-process value only "
                  "while z0 is clamped at 0"),
    "ppo": (None, "each process samples its own rollouts (the policy's sampling RNG draws per process), and "
                  "advantages are whitened per process (as TRL): a different curve, not comparable; ppo--greedy "
                  "removes both and must match"),
    "grpo": (None, "each process samples its own G completions per prompt: different updates, not comparable "
                   "(the logged loss itself is ~0 by construction with num_iterations 1 - ratio 1, advantages "
                   "zero-mean per group - so its small 1-vs-2 difference says nothing)"),
}


#: objectives whose training changes nothing by design
NO_OP = {"icl": "prompting without training: the loss is 0 x a scalar the objective owns"}


def tolerance(name: str) -> tuple[float | None, str]:
    return TOLERANCES.get(name, (EXACT, EXACT_REASON))


def launch_command(output_dir: Path, processes: int, only: str = "") -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of one launch: one process (global batch 4) or ``processes`` DDP ranks (4 / processes each)."""
    script = str(Path(__file__).resolve())
    args = [str(output_dir), "--batch-size", str(GLOBAL_BATCH // processes), *(["--only", only] if only else [])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        return [sys.executable, script, *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script,
            *args], env


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"error": f"no result ({path.name}): not run"}


def _frozen_problems(frozen: dict[str, Any]) -> list[str]:
    """What moved, was copied or trains among the teachers / reference tensors between the first and last step."""
    if not frozen:
        return []
    problems = [f"{name}: {value!r}" for name, value in frozen["start"].items() if value is False]
    for name, start in frozen["start"].items():
        end = frozen["end"].get(name)
        if end is None:
            problems.append(f"{name} is gone after training")
        elif isinstance(start, dict) and (end["ptrs"] != start["ptrs"] or end["sum"] != start["sum"]
                                          or end["device"] != start["device"]):
            problems.append(f"{name} moved or changed during training")
        if isinstance(start, dict) and start.get("trainable"):
            problems.append(f"{name} has trainable parameters")
    # (entries may be added: a precomputed reference caches the eval records when rank 0 first scores them)
    if frozen.get("to_calls"):
        problems.append(f".to() called {frozen['to_calls']} times on a teacher during training")
    return problems


def compare(one: Path, two: Path, name: str, processes: int = 2) -> dict[str, Any]:
    """Objective ``name``: the 1-process run (``one``) against the ``processes``-process run (``two``)."""
    single, ranks = _read(one / name / "rank-0.json"), [_read(two / name / f"rank-{r}.json") for r in range(processes)]
    errors = [f"{label}: {run['error']}" for label, run in [("1 process", single)] +
              [(f"rank {r}", run) for r, run in enumerate(ranks)] if run.get("error")]
    loss_tolerance, reason = tolerance(name)
    out: dict[str, Any] = {"name": name, "errors": errors, "tolerance": loss_tolerance, "reason": reason}
    if errors:
        return out
    losses_one = [s["loss"] for s in single["steps"]]
    losses_two = [s["loss"] for s in ranks[0]["steps"]]
    hashes = [[s["params"] for s in run["steps"]] for run in ranks]
    tensors_one = load_file(str(one / name / "rank-0.safetensors"))
    tensors_two = [load_file(str(two / name / f"rank-{r}.safetensors")) for r in range(processes)]
    out.update(
        losses_one=losses_one, losses_two=losses_two,
        max_loss_diff=max(abs(a - b) for a, b in zip(losses_one, losses_two, strict=True)),
        eval_diff=abs(single["eval_loss"] - ranks[0]["eval_loss"]),
        max_param_diff=max(float((tensors_one[k] - tensors_two[0][k]).abs().max()) for k in tensors_one),
        same_names=all(t.keys() == tensors_one.keys() for t in tensors_two),
        ranks_identical=all(h == hashes[0] for h in hashes) and all(
            all(torch.equal(t[k], tensors_two[0][k]) for k in t) for t in tensors_two[1:]),
        state_identical=all(run["state"] == ranks[0]["state"] for run in ranks),
        steps=[len(run["steps"]) for run in (single, *ranks)],
        finite=all(math.isfinite(x) for x in losses_one + losses_two),
        trained=hashes[0][-1] != ranks[0]["initial"],
        frozen_items=len(ranks[0]["frozen"].get("start", {})),
        frozen_problems=sorted({p for run in (single, *ranks) for p in _frozen_problems(run["frozen"])}),
        seconds_one=single["seconds"], seconds_two=ranks[0]["seconds"])
    return out


# ----------------------------------------------------------------------------- measuring
def trainable(model: nn.Module, objective: Any) -> dict[str, torch.Tensor]:
    from tunelab.train import engine

    return engine.trainable_state(model, objective.modules())


def sha(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def digest(value: Any) -> Any:
    """The objective's state as JSON: tensors by hash, floats as they are (compared across ranks)."""
    if isinstance(value, torch.Tensor):
        return "tensor:" + sha({"": value})
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [digest(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(type(value).__name__)


class ToCounter:
    """Counts ``.to(...)`` calls on a teacher module (patched on the instance) while training runs."""

    def __init__(self, module: nn.Module) -> None:
        self.calls, original = 0, module.to

        def to(*args: Any, **kwargs: Any) -> nn.Module:
            self.calls += 1
            return original(*args, **kwargs)

        module.to = to  # an instance attribute shadows nn.Module.to for this module only


def frozen_state(items: dict[str, Any]) -> dict[str, Any]:
    """``{name: [storage addresses, value sum, device]}`` of teacher modules / reference tensors (bools as they are)."""
    out = {}
    for name, value in items.items():
        if isinstance(value, nn.Module):
            params = list(value.parameters())
            out[name] = {"ptrs": [p.data_ptr() for p in params], "sum": float(sum(p.double().sum() for p in params)),
                         "device": str(params[0].device), "trainable": any(p.requires_grad for p in params)}
        elif isinstance(value, torch.Tensor):
            out[name] = {"ptrs": [value.data_ptr()], "sum": float(value.double().sum()), "device": str(value.device)}
        else:
            out[name] = value
    return out


def run_case(name: str, ctx: Context, batch_size: int, out: Path, rank: int) -> dict[str, Any]:
    from tunelab.train import TrainConfig, train

    torch.manual_seed(0)  # the same LoRA / head initialisation in every process and launch
    case = {**CASES, **VARIANTS}[name](ctx)
    model, objective = case.model, case.objective
    steps: list[dict[str, Any]] = []
    frozen: dict[str, Any] = {}
    counters: list[ToCounter] = []
    initial: list[str] = []
    original_setup, original_loss = objective.setup, objective.loss

    def setup(model_: nn.Module, accelerator: Any) -> None:
        original_setup(model_, accelerator)
        initial.append(sha(trainable(model, objective)))

    def loss(model_: nn.Module, batch: Any) -> Any:
        if case.frozen is not None and "start" not in frozen:  # the first step, after setup and sampler
            items = case.frozen()  # (where fine-tuned teachers and precomputed references are ready)
            frozen["start"] = frozen_state(items)
            counters.extend(ToCounter(m) for m in items.values() if isinstance(m, nn.Module))
        return original_loss(model_, batch)

    objective.setup, objective.loss = setup, loss

    def callback(record: dict[str, Any]) -> None:
        if "loss" in record:
            tensors = trainable(model, objective)
            steps.append({"step": record["step"], "loss": record["loss"], "grad_norm": record.get("grad_norm"),
                          "params": sha(tensors), "norm": math.sqrt(sum(float(t.double().pow(2).sum())
                                                                        for t in tensors.values()))})

    config = TrainConfig(max_steps=STEPS, batch_size=batch_size, learning_rate=1e-2, log_every=1, seed=7,
                         warmup_steps=0, eval_batch_size=4, max_eval_batches=1)
    started = time.perf_counter()
    result = train(model, case.train, objective, config, eval_records=case.eval, progress=False,
                   callbacks=[callback])
    seconds = time.perf_counter() - started
    if case.frozen is not None:
        frozen["end"] = frozen_state(case.frozen())
        frozen["to_calls"] = sum(c.calls for c in counters)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in trainable(model, objective).items()}
    save_file(tensors, str(out / name / f"rank-{rank}.safetensors"))
    return {"initial": initial[0], "steps": steps, "eval_loss": result.final_eval_loss,
            "state": digest(objective.state_dict()), "frozen": frozen, "seconds": seconds, "error": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="per process; the global batch is 4")
    parser.add_argument("--only", default="", help="comma-separated objective names (default: all registered)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["TUNELAB_HOME"] = str(args.output_dir / ".home")  # caches of this launch (fine-tuned teachers)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size * world != GLOBAL_BATCH:
        raise SystemExit(f"--batch-size {args.batch_size} x {world} processes must be {GLOBAL_BATCH}")
    from tunelab.experiments import registry

    names = [n for n in args.only.split(",") if n] or [*registry.objectives(), *VARIANTS]
    ctx = shared_context(args.output_dir / ".models", rank)
    for name in names:
        (args.output_dir / name).mkdir(parents=True, exist_ok=True)
        if name not in CASES and name not in VARIANTS:
            record = {"error": f"no DDP case for objective {name!r}: add one to tests/_ddp_objective_cases.py"}
        else:
            try:
                record = run_case(name, ctx, args.batch_size, args.output_dir, rank)
            except Exception as error:  # noqa: BLE001  recorded per objective; the test names it
                record = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                          "traceback": traceback.format_exc()[-4000:]}
                (args.output_dir / name / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))
                if world > 1:  # the other rank may wait in a collective: stop the launch (torchrun ends it)
                    print(f"rank {rank}: objective {name} failed: {record['error']}", file=sys.stderr)
                    sys.stderr.flush()
                    os._exit(3)
                continue
        (args.output_dir / name / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))
    (args.output_dir / f"done-{rank}").write_text("\n".join(names))


if __name__ == "__main__":
    main()
