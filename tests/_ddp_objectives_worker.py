"""Worker for tests/test_ddp_objectives.py and benchmarks/ddp_objectives.py: every registered objective, one launch.

    python _ddp_objectives_worker.py OUT --batch-size 4                   # the reference: one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        _ddp_objectives_worker.py OUT --batch-size 2                      # two DDP processes (gloo, CPU)

In one launch (the start-up is paid once) the worker loops over ``registry.objectives()`` and the
:data:`VARIANTS` — a newly registered objective without a case in :data:`CASES` is recorded as an
error, so the test fails for it by name — and for each builds a tiny random model (the runner's
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SEQ = 12  # max_length of the SFT-family records: every row is cut to exactly this many tokens
STEPS = 2
GLOBAL_BATCH = 4
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


class TokenReward:
    """A stand-in reward model for PPO / GRPO (as in tests/test_align.py): a deterministic function of the
    tokens, so advantages are not all zero on a random policy."""

    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return ((sequences * attention_mask).sum(-1) % 7).float()


@dataclass
class Case:
    model: nn.Module
    objective: Any
    train: list[dict]
    eval: list[dict]
    frozen: Callable[[], dict[str, Any]] | None = None  # teachers (modules) / reference tensors that must stay put


# ----------------------------------------------------------------------------- models and data
class Context:
    """The tokenizer, the saved tiny models (student, teacher, encoder) and record helpers of one process."""

    def __init__(self, root: Path) -> None:
        from tunelab.data import synthetic
        from tunelab.models import tiny

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if (root / "student" / "tokenizer.json").is_file():  # written by rank 0: every process reads the same one
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(root / "student")
        else:
            tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=synthetic.DOMAINS, n_documents=200, seed=0), 500)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        self.tokenizer = tokenizer
        self.student = self._save_llama(root / "student", 32, 0)
        self.teacher = self._save_llama(root / "teacher", 48, 1)
        self.encoder = self._save_encoder(root / "encoder")

    def _save_llama(self, path: Path, hidden: int, seed: int) -> str:
        from tunelab.models import tiny

        if not (path / "config.json").is_file():
            spec = tiny.TinySpec(hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=2 * hidden, vocab_size=len(self.tokenizer))
            tiny.build_model(spec, self.tokenizer, seed=seed).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        return str(path)

    def _save_encoder(self, path: Path) -> str:
        from transformers import BertConfig, BertForTokenClassification

        if not (path / "config.json").is_file():
            config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                pad_token_id=self.tokenizer.pad_token_id, num_labels=3)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(2)
                BertForTokenClassification(config).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        return str(path)

    def load(self, task: str = "causal_lm", labels: list[str] | None = None, path: str | None = None):
        from tunelab.models import zoo

        model, _ = zoo.load(path or self.student, task=task, label_names=labels, progress=False)
        return model

    def lora(self, model: nn.Module, task: str = "causal_lm", adapter: str = "default", **options: Any) -> nn.Module:
        from tunelab.experiments.preflight import apply_method
        from tunelab.experiments.spec import MethodSpec

        return apply_method(model, MethodSpec(name="lora", options={**LORA, **options}), task, adapter)

    def objective(self, name: str, labels: list[str] | None = None, max_length: int = SEQ, **options: Any):
        from tunelab.experiments import registry

        objective = registry.build_objective(name, options)
        objective.collator(self.tokenizer, labels, max_length=max_length, template="plain")
        return objective


def shared_context(root: Path, rank: int, timeout: float = 300.0) -> Context:
    """Rank 0 writes the models once (as a run's ranks share one model directory); the others wait for them."""
    if rank == 0 and not root.is_dir():
        staging = root.with_name(root.name + ".tmp")
        Context(staging)
        staging.rename(root)
    deadline = time.monotonic() + timeout
    while not root.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no models in {root} after {timeout:.0f} s")
        time.sleep(0.2)
    return Context(root)


def uniform(records: list[dict], collate: Callable, count: int, lengths: bool = True) -> list[dict]:
    """``count`` records that collate alone to the same signature (the most common one): the same number of
    scored labels in every ``*labels`` tensor and, with ``lengths``, the same sequence lengths. A token-mean
    loss then weighs every row alike, on one process or split over several."""
    def flat(batch: dict, prefix: str = "") -> dict[str, torch.Tensor]:  # multi-task labels are per-task dicts
        out = {}
        for key, value in batch.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            elif isinstance(value, torch.Tensor):
                out[prefix + key] = value
        return out

    def signature(record: dict) -> tuple:
        return tuple(sorted((key, tuple(value.shape) if lengths else (),
                             int((value != -100).sum()) if "labels" in key else 0)
                            for key, value in flat(collate([record])).items()))

    signatures = [signature(r) for r in records]
    best, available = Counter(signatures).most_common(1)[0]
    if available < count:
        raise RuntimeError(f"only {available} of {len(records)} records share one shape; need {count}")
    return [r for r, s in zip(records, signatures, strict=True) if s == best][:count]


def task(name: str, domain: Any = "medical", n: int = 60, split: str = "train", seed: int = 0) -> list[dict]:
    from tunelab.data import synthetic

    return synthetic.make_task(name, domain=domain, split=split, n=n, seed=seed)


def perturb_trainable(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Move the trainable tensors away from their init (an adapter an earlier stage trained)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * std)


# ----------------------------------------------------------------------------- one case per objective
def sft_family(ctx: Context, name: str, **options: Any) -> tuple[nn.Module, Any, list[dict], list[dict]]:
    model = ctx.lora(ctx.load())
    objective = ctx.objective(name, **options)
    records = uniform(task("qa", n=80), objective.collate_fn, 12)
    return model, objective, records[:8], records[8:]


def case_sft(ctx: Context) -> Case:
    return Case(*sft_family(ctx, "sft"))


def case_lm(ctx: Context) -> Case:
    model = ctx.lora(ctx.load())
    objective = ctx.objective("lm")
    texts = [{"text": r["text"]} for r in task("domain_classification", n=20)]
    records = uniform(texts, objective.collate_fn, 12)  # every text is longer than SEQ: cut to SEQ tokens
    return Case(model, objective, records[:8], records[8:])


def case_classification(ctx: Context) -> Case:
    from tunelab.data import synthetic

    labels = list(synthetic.DOMAINS)
    model = ctx.lora(ctx.load("sequence_classification", labels), "sequence_classification")
    objective = ctx.objective("classification", labels, max_length=16)
    records = task("domain_classification", domain=labels, n=12)  # one label per record: no token weighting
    return Case(model, objective, records[:8], records[8:])


def case_token_classification(ctx: Context) -> Case:
    pool = task("ner", n=80)
    labels = sorted({tag for r in pool for tag in r["ner_tags"]})
    model = ctx.lora(ctx.load("token_classification", labels), "token_classification")
    model.get_submodule("dropout").p = 0.0  # LlamaForTokenClassification's head dropout (0.1): rank-local masks
    objective = ctx.objective("token_classification", labels, max_length=32)
    records = uniform(pool, objective.collate_fn, 12, lengths=False)  # the loss counts labelled words
    return Case(model, objective, records[:8], records[8:])


def case_icl(ctx: Context) -> Case:
    return Case(*sft_family(ctx, "icl", k=1))


def case_domain_kd(ctx: Context) -> Case:
    """Teacher ``base`` (the student with its adapter disabled, no copy); the adapter starts away from the base
    so that the KD term is not zero at step 1."""
    model, objective, train, evaluation = sft_family(ctx, "domain_kd", general_tasks=["qa"], general_size=8,
                                                     kd_batch_size=2)
    general = uniform(task("qa", domain="general", n=80), objective.collate_fn, 8)
    perturb_trainable(model)
    case = Case(model, objective, train, evaluation)
    original = objective.setup

    def setup(model, accelerator):  # the general data: 8 records of one shape (the built-in ones vary)
        original(model, accelerator)
        objective.general = general

    objective.setup = setup
    case.frozen = lambda: {"teacher is None (adapter disabled, no copy)": objective.teacher is None}
    return case


def case_replay(ctx: Context) -> Case:
    model, objective, train, evaluation = sft_family(ctx, "replay", buffer_size=4, replay_ratio=0.2)
    earlier = uniform(task("qa", domain="legal", n=80), objective.collate_fn, 4)
    ctx.objective("replay", buffer_size=4, replay_ratio=0.2).on_stage_end(model, earlier)  # the buffer
    return Case(model, objective, train, evaluation)


def case_ewc(ctx: Context) -> Case:
    model, objective, train, evaluation = sft_family(ctx, "ewc", ewc_lambda=100.0, fisher_samples=4)
    earlier = uniform(task("qa", domain="legal", n=80), objective.collate_fn, 4)
    ctx.objective("ewc", ewc_lambda=100.0, fisher_samples=4).on_stage_end(model, earlier)  # Fisher + anchor
    perturb_trainable(model, std=0.05)  # away from the anchor: the penalty acts from step 1
    return Case(model, objective, train, evaluation)


def case_lwf(ctx: Context) -> Case:
    model, objective, train, evaluation = sft_family(ctx, "lwf")
    ctx.objective("lwf").on_stage_end(model, [])  # the snapshot of the previous stage
    perturb_trainable(model)  # the teacher pass swaps the snapshot in: it differs from the live weights
    case = Case(model, objective, train, evaluation)
    case.frozen = lambda: {f"snapshot/{k}": v for k, v in objective.saved.items()}
    return case


def _stage_adapter(ctx: Context, model: nn.Module, name: str) -> nn.Module:
    from tunelab.experiments.runner import _train_only

    model = ctx.lora(model, adapter=name)
    _train_only(model, name)  # as the runner leaves a stage's new adapter: earlier ones active, frozen
    return model


def case_olora(ctx: Context) -> Case:
    from tunelab.adapt.store import store

    model, objective, train, evaluation = sft_family(ctx, "olora")
    store(model)["olora"] = ["default"]  # the first stage's LoRA is finished
    return Case(_stage_adapter(ctx, model, "s1"), objective, train, evaluation)


def case_per_domain(ctx: Context) -> Case:
    from tunelab.adapt.store import store

    model, objective, train, evaluation = sft_family(ctx, "per_domain")
    store(model)["domain_adapters"] = {"legal": "default"}
    return Case(_stage_adapter(ctx, model, "s1"), objective, train, evaluation)


def case_router(ctx: Context) -> Case:
    """After two per-domain stages: the second adapter is still trainable but the router never uses it."""
    from tunelab.adapt.store import store

    model = ctx.lora(ctx.load())
    perturb_trainable(model, seed=1)
    model = _stage_adapter(ctx, model, "s1")
    perturb_trainable(model, seed=2)  # trained adapters: the router's features must be the base's, not theirs
    store(model)["domain_adapters"] = {"medical": "default", "legal": "s1"}
    objective = ctx.objective("router", domains=["medical", "legal"], max_length=16)
    records = [r for pair in zip(task("qa", "medical", 6), task("qa", "legal", 6), strict=True) for r in pair]
    return Case(model, objective, records[:8], records[8:])


def _pairs(n: int = 12) -> list[dict]:
    return task("preference", n=n)


def case_reward(ctx: Context) -> Case:
    model = ctx.lora(ctx.load())
    # centring gives the head's bias a gradient: under the plain Bradley-Terry loss it has none, and AdamW
    # turns the float noise of a zero gradient into steps of size ~lr that differ from run to run
    objective = ctx.objective("reward", max_length=32, center_rewards_coefficient=0.01)
    records = _pairs()
    return Case(model, objective, records[:8], records[8:])


def case_dpo(ctx: Context) -> Case:
    """Reference ``sft_adapter`` (a frozen copy of the trainable tensors, taken in setup) after an earlier stage
    moved the adapter."""
    model = ctx.lora(ctx.load())
    perturb_trainable(model)
    objective = ctx.objective("dpo", max_length=32, reference="sft_adapter")
    records = _pairs()
    case = Case(model, objective, records[:8], records[8:])
    case.frozen = lambda: {f"reference/{k}": v for k, v in (objective.reference.snapshot or {}).items()}
    return case


def case_kto(ctx: Context) -> Case:
    """Reference ``precomputed``: log π_ref cached per record before the first step, never recomputed."""
    model = ctx.lora(ctx.load())
    objective = ctx.objective("kto", max_length=32, reference="precomputed")
    records = _pairs(8)  # split into 2 unpaired examples each: per-process rows stay balanced
    case = Case(model, objective, records[:4], records[4:6])
    case.frozen = lambda: {f"cache/{k}": v for k, v in sorted(objective.reference.cache.items())}
    return case


def _online(ctx: Context, name: str, **options: Any) -> Case:
    model = ctx.lora(ctx.load())
    objective = ctx.objective(name, max_length=32, max_new_tokens=4, **options)
    objective.scorer = TokenReward()
    records = task("qa", n=12)
    return Case(model, objective, records[:8], records[8:])


def case_ppo(ctx: Context) -> Case:
    return _online(ctx, "ppo")


def case_grpo(ctx: Context) -> Case:
    return _online(ctx, "grpo", num_generations=2)


def case_ppo_greedy(ctx: Context) -> Case:
    """PPO without its two sources of rank-dependence — sampling (each process draws its own completions)
    and advantage whitening (a statistic of each process's rollout, as in TRL) — must match one process."""
    return _online(ctx, "ppo", temperature=0.0, whiten_advantages=False)


def case_distill(ctx: Context) -> Case:
    """A separate teacher model (48 wide, loaded by the objective) + a feature term whose projector is an
    objective module."""
    model, objective, train, evaluation = sft_family(
        ctx, "distill", teacher={"model": ctx.teacher}, temperature=2.0, alpha=0.5, evaluate_teacher=False,
        features=[{"student": "model.layers.1", "teacher": "model.layers.1"}])
    case = Case(model, objective, train, evaluation)
    case.frozen = lambda: {"teacher": objective.teachers[0]}
    return case


def case_distill_finetune(ctx: Context) -> Case:
    """The teacher is first fine-tuned on the training records (``teacher.finetune``) and cached on disk: under
    DDP every rank fine-tunes the same teacher and both write the cache."""
    model, objective, train, evaluation = sft_family(
        ctx, "distill", teacher={"model": ctx.teacher, "finetune": {"max_steps": 2, "batch_size": 4}},
        temperature=2.0, alpha=0.5, evaluate_teacher=False)
    case = Case(model, objective, train, evaluation)
    case.frozen = lambda: {"teacher": objective.teachers[0]}
    return case


def _multitask_records(objective: Any, kinds: dict[str, str], per_task: int = 8) -> list[dict]:
    out = []
    for kind in kinds.values():
        out += uniform(task(kind, n=80), objective.collate_fn, per_task, lengths=False)
    return out


def case_multitask(ctx: Context) -> Case:
    """Per-task LoRAs switched per batch (the other task's adapter gets no gradient: DDP must look for unused
    parameters) and learned uncertainty weights (an objective module)."""
    tasks = [{"name": "qa"}, {"name": "domain", "match": {"task": "domain_classification"}}]
    model = ctx.lora(ctx.load())
    objective = ctx.objective("multitask", max_length=SEQ, tasks=tasks, sharing="per_task", switching="batch",
                              weighting="uncertainty")
    records = _multitask_records(objective, {"qa": "qa", "domain": "domain_classification"}, 6)
    train = records[:4] + records[6:10]  # 4 per task: a global batch each
    evaluation = records[4:6] + records[10:12]
    return Case(model, objective, train, evaluation)


def case_multitask_encoder(ctx: Context) -> Case:
    """An encoder (tiny BERT) with hard sharing: the model's own token classifier is trainable (the runner puts it
    in modules_to_save) but unused: every task reads its own head."""
    tasks = [{"name": "domain", "match": {"task": "domain_classification"}}, {"name": "ner"}]
    model = ctx.lora(ctx.load("token_classification", ["O", "B", "I"], path=ctx.encoder), "token_classification",
                     target_modules=["query", "value"])
    objective = ctx.objective("multitask_encoder", max_length=24, tasks=tasks, sharing="hard", switching="batch")
    records = _multitask_records(objective, {"domain": "domain_classification", "ner": "ner"}, 6)
    return Case(model, objective, records[:4] + records[6:10], records[4:6] + records[10:12])


CASES: dict[str, Callable[[Context], Case]] = {
    "sft": case_sft, "lm": case_lm, "classification": case_classification,
    "token_classification": case_token_classification, "icl": case_icl, "domain_kd": case_domain_kd,
    "replay": case_replay, "ewc": case_ewc, "lwf": case_lwf, "olora": case_olora, "per_domain": case_per_domain,
    "router": case_router, "reward": case_reward, "dpo": case_dpo, "kto": case_kto, "ppo": case_ppo,
    "grpo": case_grpo, "distill": case_distill, "multitask": case_multitask,
    "multitask_encoder": case_multitask_encoder,
}
#: what each case trains (the results table in benchmarks/results/ddp_cpu.md)
SETUPS: dict[str, str] = {
    "sft": "qa records, LoRA r=4 on q/v", "lm": "plain text cut to 12 tokens",
    "classification": "LlamaForSequenceClassification, head in modules_to_save",
    "token_classification": "LlamaForTokenClassification (head dropout 0), NER tags",
    "icl": "k=1 demonstrations; loss 0 x w (trains nothing)",
    "domain_kd": "teacher base (adapter disabled, no copy); the adapter has moved",
    "replay": "buffer of 4, ratio 0.2: 1 replayed example per global batch, rank 0 only",
    "ewc": "Fisher and anchor from an earlier stage, lambda 100",
    "lwf": "snapshot of an earlier stage swapped in for the teacher pass",
    "olora": "a second LoRA, orthogonal to the finished one", "per_domain": "a second LoRA, run alone",
    "router": "domain head on frozen base features; trained adapters, one still trainable and unused",
    "reward": "scalar head, reward centring 0.01", "dpo": "reference sft_adapter (frozen copy of the adapter)",
    "kto": "reference precomputed (log-probs cached before step 1)",
    "ppo": "value head, a token-function reward, sampling T=1", "grpo": "G=2, a token-function reward, sampling T=1",
    "distill": "a 48-wide teacher model + a feature term with a projector",
    "multitask": "per-task LoRAs switched per batch, learned uncertainty weights",
    "multitask_encoder": "tiny BERT, hard sharing; its own token classifier trainable but unused",
    "ppo--greedy": "ppo with greedy rollouts and no advantage whitening",
    "distill--finetune": "the teacher fine-tuned for 2 steps first and cached on disk",
}
# variants checked beside the registered objectives (their names are not objective names)
VARIANTS: dict[str, Callable[[Context], Case]] = {"ppo--greedy": case_ppo_greedy, "distill--finetune": case_distill_finetune}


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
            record = {"error": f"no DDP case for objective {name!r}: add one to tests/_ddp_objectives_worker.py"}
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
