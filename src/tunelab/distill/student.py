"""A student initialised from its teacher's layers (DistilBERT: every second layer of BERT).

Idea (Sanh et al. 2019, arXiv:1910.01108, § 3): a student with the teacher's width and fewer layers
starts from the teacher's weights: the embeddings, the final norm and the head are copied whole, and
student layer i is a copy of teacher layer ``layers[i]`` (``every=k``: layers 0, k, 2k, ...). The
student then trains (with distillation) from a point that already computes something sensible.

    θ_S.embed = θ_T.embed,   θ_S.layer_i = θ_T.layer_{layers[i]},   θ_S.norm, θ_S.head = θ_T.norm, θ_T.head

Use from Python::

    student = init_from_teacher(teacher, every=2)

or write a student directory that any ``model: {name: <dir>}`` spec loads::

    write_student("tiny-llama-teacher", "students/half", every=2)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from tunelab.distill.passes import layer_names
from tunelab.errors import ConfigError


def chosen_layers(num_layers: int, every: int | None = None, layers: Sequence[int] | None = None) -> list[int]:
    """Teacher layer indices kept: ``layers`` as given, or ``range(0, num_layers, every)``."""
    if (every is None) == (layers is None):
        raise ConfigError("init_from_teacher takes exactly one of every=k or layers=[...]")
    if layers is None:
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        layers = list(range(0, num_layers, every))
    layers = list(layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise ConfigError(f"layers {bad or layers} are not layers of a {num_layers}-layer teacher; use 0..{num_layers - 1}")
    return layers


def init_from_teacher(teacher: nn.Module, every: int | None = None, layers: Sequence[int] | None = None) -> nn.Module:
    """A new model with the teacher's config and weights, keeping only the chosen decoder layers.

    Args:
        teacher: a Hugging Face decoder or encoder, any head (its layers in a ModuleList of
            ``config.num_hidden_layers``: ``model.layers`` in Llama, ``bert.encoder.layer`` in BERT / MiniLM).
        every: keep layers 0, every, 2·every, ...
        layers: or the explicit teacher layer indices, in student order.
    """
    names = layer_names(teacher)
    keep = chosen_layers(len(names), every, layers)
    student = copy.deepcopy(teacher)
    parent_name, _, _ = names[0].rpartition(".")
    parent = student.get_submodule(parent_name)  # the ModuleList
    source = teacher.get_submodule(parent_name)
    new_layers = nn.ModuleList(copy.deepcopy(source[i]) for i in keep)
    for position, layer in enumerate(new_layers):
        for module in layer.modules():  # Llama's self_attn, BERT's attention.self, ...
            if hasattr(module, "layer_idx"):
                module.layer_idx = position  # the KV cache is indexed by layer position
    owner_name, _, attribute = parent_name.rpartition(".")
    owner = student.get_submodule(owner_name) if owner_name else student
    setattr(owner, attribute, new_layers)
    del parent
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


def write_student(teacher_name: str, path: str | Path, every: int | None = None,
                  layers: Sequence[int] | None = None, seed: int = 0) -> Path:
    """Load ``teacher_name`` (preset, path or hub id), initialise a student from it, save it at ``path``."""
    from tunelab.models import zoo

    teacher, tokenizer = zoo.load(teacher_name, seed=seed, progress=False)
    student = init_from_teacher(teacher, every=every, layers=layers)
    target = Path(path)
    student.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
