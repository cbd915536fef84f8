"""Collators: records -> padded LongTensor batches, with the loss mask in ``labels``.

Causal-LM SFT minimises the negative log-likelihood of the response given the prompt,

    L = - sum_t m_t log p(x_t | x_<t),     m_t = 1 on response (+EOS) tokens, 0 elsewhere,

and Hugging Face models implement ``m_t = 0`` as ``labels[t] = -100`` (``IGNORE_INDEX``). So:

- ``SFTCollator`` renders a record with a template (``tunelab.data.templates``) into segments
  ``(text, trainable)``, tokenizes each segment on its own (``BOS + prompt``, ``response + EOS``),
  concatenates, and copies the ids of trainable segments into ``labels``. Chat records train every
  assistant turn; all other turns are masked.
- Truncation keeps the response: the prompt is cut **from the left** (the tokens next to the response
  stay), but keeps at least ``min(len(prompt), budget // 2)`` tokens; only when the response alone is
  longer than the rest of the budget is the response cut **on the right** (and then it has no EOS,
  because it did not end). ``budget = max_length - 1`` for the BOS token.
- Padding is on the right with ``pad_token_id`` (``eos_token_id`` when the tokenizer has no pad
  token); padded positions have ``attention_mask = 0`` and ``labels = -100``.
- ``ClassificationCollator`` gives a class index per record; ``TokenClassificationCollator`` aligns
  word-level BIO tags to sub-tokens as in Hugging Face's token-classification recipe (first sub-token
  of a word carries the tag, the others and special tokens get -100); ``PreferenceCollator`` encodes
  the chosen and rejected responses after the same prompt, for DPO-style objectives.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab import IGNORE_INDEX  # the one definition; re-exported for older imports
from tunelab.data.templates import Segment, record_segments
from tunelab.errors import ConfigError, DataError, ModelError


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: ``pad_token_id``, else ``eos_token_id``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return pad


def pad_right(sequences: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """(B, T) LongTensor of the sequences right-padded with ``value`` to ``length`` (default: longest)."""
    length = max(map(len, sequences), default=0) if length is None else length
    batch = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return batch


def _batch(ids: list[list[int]], labels: list[list[int]], pad: int, length: int | None = None) -> dict:
    length = max(map(len, ids), default=0) if length is None else length
    return {
        "input_ids": pad_right(ids, pad, length),  # (B, T)
        "attention_mask": pad_right([[1] * len(seq) for seq in ids], 0, length),  # (B, T)
        "labels": pad_right(labels, IGNORE_INDEX, length),  # (B, T)
    }


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")


def _truncate(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut the prompt from the left and, only if still needed, the response from the right."""
    if len(prompt) + len(response) <= budget:
        return prompt, response
    keep_prompt = max(budget - len(response), min(len(prompt), budget // 2))
    return prompt[len(prompt) - keep_prompt :], response[: budget - keep_prompt]


class SegmentEncoder:
    """Tokenize ``(text, trainable)`` segments into ``(input_ids, labels)`` under the policy above."""

    def __init__(self, tokenizer: Any, max_length: int, add_eos: bool = True, mask_prompt: bool = True):
        _check_max_length(max_length)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.add_eos, self.mask_prompt = add_eos, mask_prompt
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def __call__(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        pieces = [(self.tokens(text), trainable) for text, trainable in segments]
        last = max((i for i, (_, trainable) in enumerate(pieces) if trainable), default=len(pieces))
        # anything a template renders after the final response is dropped: the sequence ends there
        response = list(pieces[last][0]) if last < len(pieces) else []
        if self.add_eos and self.eos is not None and response[-1:] != [self.eos]:
            response.append(self.eos)
        prompt_ids, prompt_labels = [], []
        for ids, trainable in pieces[:last]:
            prompt_ids += ids
            prompt_labels += ids if trainable else [IGNORE_INDEX] * len(ids)
        bos: list[int] = []
        if self.bos is not None:
            if prompt_ids[:1] == [self.bos]:  # a chat template wrote BOS itself: use that one, not two
                prompt_ids, prompt_labels = prompt_ids[1:], prompt_labels[1:]
            bos = [self.bos]
        budget = self.max_length - len(bos)
        prompt_ids, response = _truncate(prompt_ids, response, budget)
        prompt_labels = prompt_labels[len(prompt_labels) - len(prompt_ids) :]
        ids = bos + prompt_ids + response
        if not self.mask_prompt:
            return ids, list(ids)
        return ids, [IGNORE_INDEX] * len(bos) + prompt_labels + response


class SFTCollator:
    """Supervised fine-tuning batches for a causal LM.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: maximum tokens per example (BOS, prompt, response and EOS included).
        mask_prompt: labels = -100 on everything but the response (and EOS); False trains on all tokens.
        template: a name from ``tunelab.data.templates.TEMPLATES``.
        add_eos: append EOS after the final response so the model learns to stop.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        mask_prompt: bool = True,
        template: str = "plain",
        add_eos: bool = True,
    ):
        self.tokenizer, self.template = tokenizer, template
        self.encoder = SegmentEncoder(tokenizer, max_length, add_eos=add_eos, mask_prompt=mask_prompt)
        self.pad = pad_token_id(tokenizer)

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one record, unpadded."""
        if record.get("kind") == "preference" or ("response" not in record and "messages" not in record):
            raise DataError(
                f"record {record.get('id', '?')!r} has no response; SFTCollator needs prompt/response "
                "or chat messages (use PreferenceCollator for chosen/rejected pairs)"
            )
        return self.encoder(record_segments(record, self.template, self.tokenizer))

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = zip(*(self.encode(record) for record in records), strict=True)
        return _batch(list(ids), list(labels), self.pad)


class PreferenceCollator:
    """Chosen and rejected responses after the same prompt: ``chosen_*`` and ``rejected_*`` tensors.

    Only the final response is trained (earlier assistant turns of a multi-turn prompt are context).
    Both halves are padded to one length so they can be concatenated along the batch axis.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256, template: str = "plain", add_eos: bool = True):
        self.tokenizer, self.template = tokenizer, template
        self.encoder = SegmentEncoder(tokenizer, max_length, add_eos=add_eos, mask_prompt=True)
        self.pad = pad_token_id(tokenizer)

    def encode(self, record: dict, side: str) -> tuple[list[int], list[int]]:
        if not isinstance(record.get(side), str):
            raise DataError(
                f"record {record.get('id', '?')!r} has no string {side!r}; PreferenceCollator needs "
                "prompt/chosen/rejected records"
            )
        segments = record_segments(record, self.template, self.tokenizer, response=record[side])
        last = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments))
        return self.encoder([(text, trainable and i == last) for i, (text, trainable) in enumerate(segments)])

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        chosen = [self.encode(record, "chosen") for record in records]
        rejected = [self.encode(record, "rejected") for record in records]
        length = max(len(ids) for ids, _ in chosen + rejected)
        batch = {}
        for side, pairs in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = zip(*pairs, strict=True)
            for key, tensor in _batch(list(ids), list(labels), self.pad, length).items():
                batch[f"{side}_{key}"] = tensor
        return batch


def _label_index(label_names: list[str]) -> dict[str, int]:
    if not label_names:
        raise ConfigError("label_names is empty; pass the class names, e.g. synthetic.label_names(task)")
    return {str(name): index for index, name in enumerate(label_names)}


class ClassificationCollator:
    """Sequence classification: ``input_ids``, ``attention_mask`` and ``labels`` = class index (B,)."""

    def __init__(self, tokenizer: Any, label_names: list[str], max_length: int = 128):
        _check_max_length(max_length)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.label_names, self.index = list(label_names), _label_index(label_names)
        self.pad = pad_token_id(tokenizer)

    def label(self, record: dict) -> int:
        label = str(record.get("label"))
        if label not in self.index:
            raise DataError(
                f"record {record.get('id', '?')!r} has unknown label {label!r}; "
                f"expected one of {self.label_names}"
            )
        return self.index[label]

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        ids = []
        for record in records:
            if not isinstance(record.get("text"), str):
                raise DataError(
                    f"record {record.get('id', '?')!r} has no string 'text'; "
                    "ClassificationCollator needs text/label records"
                )
            encoded = self.tokenizer(record["text"], truncation=True, max_length=self.max_length)
            ids.append(list(encoded["input_ids"]))
        length = max(map(len, ids))
        return {
            "input_ids": pad_right(ids, self.pad, length),  # (B, T)
            "attention_mask": pad_right([[1] * len(seq) for seq in ids], 0, length),  # (B, T)
            "labels": torch.tensor([self.label(record) for record in records], dtype=torch.long),  # (B,)
        }


class TokenClassificationCollator:
    """NER batches: word-level BIO tags aligned to sub-tokens through ``word_ids()``."""

    def __init__(self, tokenizer: Any, label_names: list[str], max_length: int = 128):
        _check_max_length(max_length)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                "TokenClassificationCollator needs a fast tokenizer (word_ids); load it with use_fast=True"
            )
        self.tokenizer, self.max_length = tokenizer, max_length
        self.label_names, self.index = list(label_names), _label_index(label_names)
        self.pad = pad_token_id(tokenizer)

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        tokens, tags = record.get("tokens"), record.get("ner_tags")
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
            raise DataError(
                f"record {record.get('id', '?')!r} needs lists 'tokens' and 'ner_tags' of equal length"
            )
        unknown = sorted({str(tag) for tag in tags} - set(self.index))
        if unknown:
            raise DataError(
                f"record {record.get('id', '?')!r} has unknown tag(s) {unknown}; "
                f"expected one of {self.label_names}"
            )
        encoded = self.tokenizer(
            tokens, is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        labels, previous = [], None
        for word in encoded.word_ids():
            first_piece = word is not None and word != previous
            labels.append(self.index[str(tags[word])] if first_piece else IGNORE_INDEX)
            previous = word
        return list(encoded["input_ids"]), labels

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = zip(*(self.encode(record) for record in records), strict=True)
        return _batch(list(ids), list(labels), self.pad)
