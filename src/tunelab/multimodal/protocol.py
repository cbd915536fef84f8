"""The base-to-novel protocol of CoCoOp and MaPLe: few-shot prompt learning on base classes only,
evaluation on base and on novel classes, harmonic mean.

Zhou et al., 2022 ("Conditional Prompt Learning for Vision-Language Models", CVPR, arXiv:2203.05557)
introduced it to measure whether learned prompts generalise beyond the classes they were trained on;
MaPLe (Khattak et al., 2023) reports the same table. The steps, with tunelab's image world:

1. the classes are split in half (:func:`images.split_classes`: a colour × shape checkerboard);
2. prompts are learned on ``shots`` images per **base** class (task style: noise and clutter), with
   cross-entropy over the base classes (:class:`~tunelab.multimodal.clip.ZeroShotClassifier`);
3. the tuned model is evaluated on held-out images of the base classes (classifying among the base
   classes) and, zero-shot, of the novel classes (classifying among the novel classes) — the learned
   prompts are reused as they are, only the class names change;
4. HM = 2 · base · novel / (base + novel) rewards methods that improve base accuracy without
   losing CLIP's generalisation to unseen classes.

Zero-shot CLIP (hand-written prompt "a photo of a {class}", no training) is the baseline. The test
sets are fixed (one seed for all runs); ``seed`` varies the few-shot sample and the prompt initialisation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerFast

from tunelab import tuners
from tunelab.multimodal import clip, images

TEST_SEED = 999_999  # one fixed test set for every run and seed


@dataclass
class BaseNovelTask:
    """Few-shot training images of the base classes and test images of base and novel classes."""

    base_classes: list[str]
    novel_classes: list[str]
    train: images.ImageSet
    test_base: images.ImageSet
    test_novel: images.ImageSet


def make_task(shots: int = 16, seed: int = 0, test_per_class: int = 50, style: images.Style = images.TASK_STYLE,
              image_size: int = images.IMAGE_SIZE) -> BaseNovelTask:
    """The few-shot base-to-novel task: ``shots`` training images per base class (seeded)."""
    split = images.split_classes()
    train = images.sample_images(split["base"], shots, seed=seed, style=style, size=image_size)
    test_base = images.sample_images(split["base"], test_per_class, seed=TEST_SEED, style=style, size=image_size)
    test_novel = images.sample_images(split["novel"], test_per_class, seed=TEST_SEED + 1, style=style,
                                      size=image_size)
    return BaseNovelTask(split["base"], split["novel"], train, test_base, test_novel)


@dataclass
class PromptRecipe:
    """One row of the table: a method with its options and its training budget."""

    method: str | None  # None: zero-shot CLIP
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-2
    steps: int = 200
    batch_size: int = 32
    init_from_template: bool = False  # initialise text context from "a photo of a" (num_virtual_tokens words)


# Learning rates chosen per method on a separate validation sample of the *base* classes (seed 0, lr in
# {1e-3, 3e-3}); novel classes and the test sets played no part in the choice.
RECIPES: dict[str, PromptRecipe] = {
    "zero-shot CLIP": PromptRecipe(None),
    "CoOp": PromptRecipe("coop", {"num_virtual_tokens": 4}, learning_rate=1e-3, init_from_template=True),
    "VPT-shallow": PromptRecipe("vpt", {"num_virtual_tokens": 4}, learning_rate=3e-3),
    "VPT-deep": PromptRecipe("vpt", {"num_virtual_tokens": 4, "deep": True}, learning_rate=1e-3),
    "MaPLe": PromptRecipe("maple", {"num_virtual_tokens": 2, "prompt_depth": 3}, learning_rate=1e-3,
                          init_from_template=True),
}


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 b n / (b + n); 0 when both are 0."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def _collate(records: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in records]),  # (B, 3, H, W)
            "labels": torch.tensor([r["labels"] for r in records])}


def learn_prompts(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, recipe: PromptRecipe,
                  task: BaseNovelTask, seed: int = 0, progress: bool = False) -> tuple[CLIPModel, dict[str, Any]]:
    """A copy of ``model`` with ``recipe``'s prompts learned on ``task.train``; and training facts."""
    from tunelab.train import TrainConfig, train

    tuned = copy.deepcopy(model)
    if recipe.method is None:
        return tuned, {"trainable_parameters": 0, "train_seconds": 0.0, "final_loss": None}
    options = dict(recipe.options)
    if recipe.init_from_template:
        options["init_token_ids"] = clip.template_token_ids(tokenizer, options.get("num_virtual_tokens"))
    classifier = clip.ZeroShotClassifier.from_class_names(tuned, tokenizer, task.base_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the prompt initialisation is part of the seeded run
        tuners.apply(classifier, recipe.method, **options)
    records = [{"pixel_values": torch.from_numpy(pixels), "labels": int(label)}
               for pixels, label in zip(task.train.pixel_values, task.train.labels, strict=True)]
    config = TrainConfig(learning_rate=recipe.learning_rate, max_steps=recipe.steps, batch_size=recipe.batch_size,
                         schedule="cosine", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                         eval_every=None, save_every=None, log_every=max(1, recipe.steps // 4), seed=seed)
    started = time.perf_counter()
    result = train(classifier, records, _collate, config, progress=progress)
    facts = {"trainable_parameters": sum(p.numel() for _, p in tuners.trainable_parameters(tuned)),
             "train_seconds": time.perf_counter() - started,
             "final_loss": result.history[-1]["loss"] if result.history else None}
    return tuned, facts


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerFast, task: BaseNovelTask) -> dict[str, float]:
    """``{"base", "novel", "hm"}`` accuracies of a (tuned) CLIP: base among base classes, novel among novel."""
    base = clip.accuracy(clip.ZeroShotClassifier.from_class_names(model, tokenizer, task.base_classes),
                         task.test_base)
    novel = clip.accuracy(clip.ZeroShotClassifier.from_class_names(model, tokenizer, task.novel_classes),
                          task.test_novel)
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}


def run(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, recipe: PromptRecipe, shots: int = 16,
        seed: int = 0, task: BaseNovelTask | None = None) -> dict[str, Any]:
    """One cell of the table: learn ``recipe``'s prompts on base classes, evaluate base and novel."""
    task = task or make_task(shots=shots, seed=seed)
    tuned, facts = learn_prompts(model, tokenizer, recipe, task, seed=seed)
    return {**evaluate(tuned, tokenizer, task), **facts, "shots": shots, "seed": seed}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds of base, novel and hm, per method name (``row["name"]``)."""
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(row["name"] for row in rows):
        mine = [row for row in rows if row["name"] == name]
        summary[name] = {}
        for key in ("base", "novel", "hm"):
            values = np.array([row[key] for row in mine])
            summary[name][key] = float(values.mean())
            summary[name][f"{key}_std"] = float(values.std())
        summary[name]["trainable_parameters"] = mine[0]["trainable_parameters"]
    return summary
