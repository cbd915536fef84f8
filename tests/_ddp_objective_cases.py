"""The cases of tests/_ddp_objectives_worker.py: for each registered objective (and a few variants), a
tiny random model with the runner's ``apply_method``, the objective with its usual options and the
earlier-stage state it expects, and a handful of built-in-world records of equal scored length.

:data:`CASES` maps an objective name to its case; :data:`SETUPS` says in one line what each case trains
(the table in benchmarks/results/ddp_cpu.md); :data:`VARIANTS` are extra cases checked beside them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
    _train_only(model, [name])  # as the runner leaves a stage's new adapter: earlier ones active, frozen
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


def case_distill_classification(ctx: Context) -> Case:
    """A tiny BERT classifier (LoRA on query/value, head in modules_to_save) learns from a tiny BERT teacher
    fine-tuned on the training records first (a classifier head, cached on disk) + a feature term."""
    from tunelab.data import synthetic

    labels = list(synthetic.DOMAINS[:3])  # the saved encoder's head has 3 outputs
    model = ctx.lora(ctx.load("sequence_classification", labels, path=ctx.encoder), "sequence_classification",
                     target_modules=["query", "value"])
    objective = ctx.objective("distill_classification", labels, max_length=16, temperature=2.0, alpha=0.5,
                              evaluate_teacher=False, teacher={"model": ctx.encoder,
                                                               "finetune": {"max_steps": 2, "batch_size": 4}},
                              features=[{"student": "bert.encoder.layer.1", "teacher": "bert.encoder.layer.1"}])
    records = task("domain_classification", domain=labels, n=12)
    case = Case(model, objective, records[:8], records[8:])
    case.frozen = lambda: {"teacher": objective.teacher}
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
    "grpo": case_grpo, "distill": case_distill, "distill_classification": case_distill_classification,
    "multitask": case_multitask,
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
    "distill_classification": "tiny BERT classifier; a BERT teacher fine-tuned 2 steps first (cached) + a feature term",
    "multitask": "per-task LoRAs switched per batch, learned uncertainty weights",
    "multitask_encoder": "tiny BERT, hard sharing; its own token classifier trainable but unused",
    "ppo--greedy": "ppo with greedy rollouts and no advantage whitening",
    "distill--finetune": "the teacher fine-tuned for 2 steps first and cached on disk",
}
# variants checked beside the registered objectives (their names are not objective names)
VARIANTS: dict[str, Callable[[Context], Case]] = {"ppo--greedy": case_ppo_greedy, "distill--finetune": case_distill_finetune}
