"""The ``tiny-clip`` preset: a tiny ``transformers.CLIPModel`` that tunelab pretrains contrastively.

Why: prompt tuning of vision-language models (CoOp, VPT, MaPLe) starts from a pretrained CLIP, and
this machine can download none. So tunelab builds one from a tiny ``CLIPConfig`` (32 × 32 images,
8 × 8 patches, 3 layers of width 64 per encoder) with a word-level tokenizer over the image world's
vocabulary, and pretrains it on freshly rendered image–caption pairs of :mod:`images` (clean style,
all 24 classes — like CLIP, which saw "everything" on the web; the base/novel split only enters at
prompt learning).

Pretraining objective — CLIP's symmetric InfoNCE (Radford et al., 2021), with one change: captions
repeat within a batch (the world has a few hundred distinct captions), so every pair with the *same*
caption counts as a positive instead of a false negative::

    S = exp(t) · norm(f_img) norm(f_txt)ᵀ              (B, B) scaled cosine similarities
    Y_ij = [caption_i == caption_j] / Σ_k [caption_i == caption_k]   row-normalised positives
    L = ½ (CE(S, Y) + CE(Sᵀ, Y))                         soft-target cross-entropy both ways

Text pooling: CLIP's text encoder pools the hidden state at the EOS token. transformers ≥ 4.31 finds
it as the first position where ``input_ids == config.eos_token_id`` unless ``eos_token_id == 2`` (the
legacy "argmax id" rule), so the tokenizer puts ``<eos>`` at id 3 and the config says so.

Cache (``$TUNELAB_HOME/models/tiny-clip[-seedN]/``): ``config.json``, ``model.safetensors``,
tokenizer files and ``pretrain.json`` (zero-shot accuracy on base and novel classes, clean and task
style), written to a temporary directory and renamed, deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput

from tunelab.models import tiny
from tunelab.multimodal import images

NAME = "tiny-clip"
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
EOS_ID = 3  # ids 0..3 follow SPECIAL_TOKENS' order; 3, not 2, so pooling uses the eos_token_id rule
MAX_TEXT_LENGTH = 16  # the longest caption is 10 words + <bos> + <eos>


@dataclass(frozen=True)
class ClipSpec:
    """Architecture and pretraining budget of a tiny CLIP."""

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    projection_dim: int = 64
    image_size: int = images.IMAGE_SIZE
    patch_size: int = 8  # 4 x 4 patches + CLS = 17 tokens: cheap, and shapes still span several patches
    steps: int = 800
    batch_size: int = 128  # contrastive learning wants many negatives per batch
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    eval_per_class: int = 40  # test images per class for the zero-shot accuracies in pretrain.json


PRESET = ClipSpec()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary: ``<bos> w1 ... wn <eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in images.vocabulary():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.model_max_length = MAX_TEXT_LENGTH
    assert fast.eos_token_id == EOS_ID
    return fast


def clip_config(spec: ClipSpec, vocab_size: int, initializer_factor: float = 1.0) -> CLIPConfig:
    """A ``CLIPConfig`` of ``spec``'s sizes; dropout is zero (tiny models, deterministic training)."""
    shared = dict(initializer_factor=initializer_factor, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  projection_dim=spec.projection_dim, attention_dropout=0.0)
    text = dict(shared, vocab_size=vocab_size, max_position_embeddings=MAX_TEXT_LENGTH,
                pad_token_id=0, bos_token_id=2, eos_token_id=EOS_ID)
    vision = dict(shared, image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim,
                      initializer_factor=initializer_factor)


def build_model(spec: ClipSpec, vocab_size: int, seed: int, initializer_factor: float = 1.0) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` (seeded; does not disturb the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(spec, vocab_size, initializer_factor))
    return model.eval()


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``: right-padded (N, T) LongTensors."""
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


class ZeroShotClassifier(nn.Module):
    """CLIP as an image classifier: one text prompt per class, logits = scaled cosine similarities.

    ``logits = exp(t) · norm(f_img(x)) · norm(f_txt(prompt_c))ᵀ`` — CLIP's zero-shot rule and the
    training objective of CoOp / VPT / MaPLe (cross-entropy over the classes). The text features are
    recomputed in every forward, since text prompts change them while training. The class prompts are
    non-persistent buffers: ``state_dict`` holds exactly the CLIP weights.
    """

    def __init__(self, clip: CLIPModel, class_input_ids: torch.Tensor, class_attention_mask: torch.Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("class_input_ids", class_input_ids, persistent=False)  # (C, T)
        self.register_buffer("class_attention_mask", class_attention_mask, persistent=False)  # (C, T)

    @classmethod
    def from_class_names(cls, clip: CLIPModel, tokenizer: PreTrainedTokenizerFast, class_names: list[str],
                         template: str = images.CLASS_TEMPLATE) -> ZeroShotClassifier:
        encoded = encode_texts(tokenizer, [template.format(name) for name in class_names])
        return cls(clip, encoded["input_ids"], encoded["attention_mask"])

    def class_features(self) -> torch.Tensor:
        text = self.clip.get_text_features(input_ids=self.class_input_ids,
                                           attention_mask=self.class_attention_mask).pooler_output  # (C, P)
        return text / text.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        image = self.clip.get_image_features(pixel_values=pixel_values).pooler_output  # (B, P)
        image = image / image.norm(dim=-1, keepdim=True)
        logits = self.clip.logit_scale.exp() * image @ self.class_features().t()  # (B, C)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def accuracy(classifier: nn.Module, image_set: images.ImageSet, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``classifier`` (any model returning ``.logits``) on ``image_set``."""
    classifier.eval()
    correct = 0
    for start in range(0, len(image_set), batch_size):
        pixels = torch.from_numpy(image_set.pixel_values[start:start + batch_size])
        predicted = classifier(pixel_values=pixels).logits.argmax(dim=-1)
        correct += int((predicted.numpy() == image_set.labels[start:start + batch_size]).sum())
    return correct / len(image_set)


def contrastive_loss(logits_per_text: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with every equal-caption pair a positive (see the module docstring)."""
    positives = (caption_ids[:, None] == caption_ids[None, :]).float()  # (B, B)
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric matrix, rows sum to 1
    loss_text = nn.functional.cross_entropy(logits_per_text, targets)
    loss_image = nn.functional.cross_entropy(logits_per_text.t(), targets)
    return (loss_text + loss_image) / 2


class _PairCollator:
    """Renders each record's image–caption pair from its seed (fresh data every step, no stored images)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [images.sample_captioned(record["seed"], images.PRETRAIN_STYLE) for record in records]
        captions = [caption for _, caption, _ in pairs]
        index = {text: i for i, text in enumerate(dict.fromkeys(captions))}
        batch = encode_texts(self.tokenizer, captions)
        batch["pixel_values"] = torch.from_numpy(np.stack([pixels for pixels, _, _ in pairs]))  # (B, 3, H, W)
        batch["caption_ids"] = torch.tensor([index[text] for text in captions])  # (B,)
        return batch


def _clip_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    return contrastive_loss(out.logits_per_text, batch["caption_ids"])


def zero_shot_report(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                     per_class: int = 40) -> dict[str, float]:
    """Zero-shot accuracy over the 12 base and the 12 novel classes, in the clean and the task style."""
    report = {}
    for style_name, style in (("clean", images.PRETRAIN_STYLE), ("task", images.TASK_STYLE)):
        for split, names in images.split_classes().items():
            test = images.sample_images(names, per_class, seed=10_000 + seed, style=style)
            classifier = ZeroShotClassifier.from_class_names(model, tokenizer, names)
            report[f"zero_shot_{split}_{style_name}"] = accuracy(classifier, test)
    return report


def pretrain(home: Path | None = None, seed: int = 0, progress: bool = True, steps: int | None = None,
             force: bool = False, spec: ClipSpec = PRESET) -> Path:
    """Pretrain tiny-clip contrastively and cache it; returns the cache directory (a no-op when cached).

    Deterministic for a seed; ``steps`` overrides the preset's budget (tests use a handful).
    """
    target = tiny.cache_dir(NAME, seed, home)
    if (target / "pretrain.json").exists() and not force:
        return target
    from tunelab.train import TrainConfig, train

    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = build_tokenizer()
    model = build_model(spec, len(tokenizer), seed)
    steps = steps or spec.steps
    config = TrainConfig(learning_rate=spec.learning_rate, max_steps=steps, batch_size=spec.batch_size,
                         schedule="cosine", warmup_ratio=spec.warmup_ratio, weight_decay=0.1, max_grad_norm=1.0,
                         eval_every=None, save_every=None, log_every=50, seed=seed)
    base = seed * 10_000_000  # disjoint per-seed ranges of image seeds: every step sees fresh pairs
    records = [{"seed": base + i} for i in range(steps * spec.batch_size)]
    result = train(model, records, _PairCollator(tokenizer), config, loss_fn=_clip_loss, progress=progress)
    report = {"name": NAME, "seed": seed, "spec": asdict(spec), "steps": result.steps,
              "parameters": sum(p.numel() for p in model.parameters()),
              "final_train_loss": result.history[-1]["loss"] if result.history else None,
              **zero_shot_report(model, tokenizer, seed, spec.eval_per_class), "seconds": time.perf_counter() - started}
    tiny._write_atomically(target, model, tokenizer, report)
    return target


def load(seed: int = 0, progress: bool = True, home: Path | None = None) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """``(CLIPModel, tokenizer)`` of tiny-clip, pretraining it first if it is not cached."""
    path = pretrain(home=home, seed=seed, progress=progress)
    model = CLIPModel.from_pretrained(path).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def pretrain_report(seed: int = 0, home: Path | None = None) -> dict:
    """The metrics recorded in ``pretrain.json`` when tiny-clip was pretrained."""
    return json.loads((tiny.cache_dir(NAME, seed, home) / "pretrain.json").read_text())


def tiny_random_clip(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, image_size: int = 16,
                     initializer_factor: float = 1.0) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """An untrained, very small CLIP (for tests): 16 × 16 images, 2 layers of width 32 per encoder."""
    spec = ClipSpec(hidden_size=hidden_size, num_layers=num_layers, num_heads=4, intermediate_size=2 * hidden_size,
                    projection_dim=hidden_size, image_size=image_size, patch_size=8)
    tokenizer = build_tokenizer()
    return build_model(spec, len(tokenizer), seed, initializer_factor), tokenizer


def template_token_ids(tokenizer: PreTrainedTokenizerFast, count: int | None = None,
                       template: str = images.CLASS_TEMPLATE) -> list[int]:
    """Ids of the template's prompt words ("a photo of a"), the first ``count`` of them: CoOp's ctx_init."""
    ids = tokenizer(template.replace("{}", "").strip(), add_special_tokens=False)["input_ids"]
    return ids[:count] if count is not None else ids


def tiny_random_classifier(seed: int = 0, num_classes: int = 4) -> ZeroShotClassifier:
    """A :func:`tiny_random_clip` as a classifier over the first ``num_classes`` classes (test matrix)."""
    # initializer_factor 3: token embeddings at std 0.06, not 0.02, so that one AdamW step of lr 1e-2 (the
    # matrix's) is a small move for context vectors copied from them
    model, tokenizer = tiny_random_clip(seed, initializer_factor=3.0)
    return ZeroShotClassifier.from_class_names(model, tokenizer, images.class_names()[:num_classes]).eval()


def example_batch(classifier: ZeroShotClassifier, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch ``{"pixel_values", "labels"}`` for ``classifier`` (``.loss`` and ``.logits``)."""
    generator = torch.Generator().manual_seed(seed)
    size = classifier.clip.config.vision_config.image_size
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),  # (B, 3, H, W)
            "labels": torch.randint(0, len(classifier.class_input_ids), (batch_size,), generator=generator)}
