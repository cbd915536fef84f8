"""FeatureTap: captures what output_hidden_states reports, keeps gradients, always releases its hooks."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models.hooks import FeatureTap, FeatureTapError, match_modules
from tunelab.models.testing import example_batch, tiny_bert, tiny_llama


def inputs(model):
    batch = example_batch(model, batch_size=2, seq_len=6)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def hook_count(model):
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


@pytest.mark.parametrize("build, template", [(tiny_llama, "model.layers.{i}"), (tiny_bert, "bert.encoder.layer.{i}")])
def test_captures_the_same_tensors_as_output_hidden_states(build, template):
    model = build()
    with FeatureTap(model, template) as tap:
        hidden_states = model(**inputs(model), output_hidden_states=True).hidden_states
    assert tap.names == [template.format(i=0), template.format(i=1)]
    # Llama's last entry is after the final norm, so compare the layers whose outputs it reports raw.
    last = 1 if build is tiny_llama else 2
    for layer in range(last):
        assert torch.equal(tap.features[template.format(i=layer)], hidden_states[layer + 1])


def test_tuple_outputs_give_their_first_element():
    model = tiny_bert()
    with FeatureTap(model, "attention.self") as tap:  # BERT's self-attention returns (context, probs)
        model(**inputs(model))
    assert all(tap[name].shape == (2, 6, 32) for name in tap.names) and len(tap.names) == 2


def test_selection_by_name_suffix_template_and_regex():
    model = tiny_llama()
    assert match_modules(model, "model.layers.1.mlp") == ["model.layers.1.mlp"]
    assert match_modules(model, "self_attn") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert match_modules(model, ["model.layers.{i}", r"model\.layers\.\d+\.mlp\.down_proj"]) == [
        "model.layers.0", "model.layers.0.mlp.down_proj", "model.layers.1", "model.layers.1.mlp.down_proj"]


def test_a_name_that_matches_nothing_fails_in_one_line_with_suggestions():
    model = tiny_llama()
    with pytest.raises(FeatureTapError) as error:
        FeatureTap(model, ["self_attn", "model.layer.0"])
    message = str(error.value)
    assert isinstance(error.value, TunelabError) and "\n" not in message
    assert "'model.layer.0'" in message and "model.layers.0" in message
    assert hook_count(model) == 0


def test_hooks_are_released_on_exit_even_when_the_forward_raises():
    model = tiny_llama()
    with FeatureTap(model, "model.layers.{i}"):
        assert hook_count(model) == 3  # two layers + the root's clearing pre-hook
        model(**inputs(model))
    assert hook_count(model) == 0
    bad = torch.full((1, 4), 10_000)  # out of vocabulary: the embedding raises
    with pytest.raises(IndexError), FeatureTap(model, "model.layers.{i}"):
        model(input_ids=bad)
    assert hook_count(model) == 0 and all(not module._forward_hooks for module in model.modules())


def test_gradient_flows_through_captured_features_unless_detached():
    model = tiny_llama()
    with FeatureTap(model, "model.layers.0") as tap:
        model(**inputs(model))
    tap["model.layers.0"].pow(2).mean().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.down_proj.weight.grad is None  # later layers are not on the path
    with FeatureTap(model, "model.layers.0", detach=True) as tap:
        model(**inputs(model))
    assert not tap["model.layers.0"].requires_grad


def test_features_are_cleared_between_forwards():
    model = tiny_llama()
    with FeatureTap(model, "model.layers.1") as tap:
        model(**inputs(model))
        assert tap["model.layers.1"].shape[0] == 2
        model(input_ids=torch.tensor([[5, 6, 7]]))
        assert tap["model.layers.1"].shape[:2] == (1, 3)  # replaced by the newer pass
        tap.clear()
        assert tap.features == {}
    assert tap.features == {}
