"""CoOp, VPT and MaPLe on a tiny random CLIP: each method's equation, errors, and what the matrix can't check.

The generic checks (save/load, disable, unload, one step lowers the loss) run in test_tuner_matrix.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab import tuners
from tunelab.errors import MethodError
from tunelab.models import testing
from tunelab.multimodal import clip, images, protocol
from tunelab.tuners.prompts import clip_layers

TEXTS = ["a photo of a red circle", "a photo of a blue cross"]


@pytest.fixture
def model():
    return clip.tiny_random_clip(seed=0)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return clip.build_tokenizer()


def inputs(tokenizer, n_images: int = 2) -> dict[str, torch.Tensor]:
    batch = clip.encode_texts(tokenizer, TEXTS)
    batch["pixel_values"] = torch.randn(n_images, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return batch


def capture_inputs(module: torch.nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    return seen, module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))


def test_coop_replaces_the_prompt_words_by_context_vectors(model, tokenizer) -> None:
    batch = clip.encode_texts(tokenizer, TEXTS)
    embeddings = model.text_model.embeddings
    with torch.no_grad():
        token = embeddings.token_embedding(batch["input_ids"])  # (B, T, D) before tuning
        position = embeddings.position_embedding.weight[: batch["input_ids"].shape[1]]
    tuners.apply(model, "coop", num_virtual_tokens=4)
    context = model.text_model.embeddings.token_embedding.prompt["default"]  # (M, D)
    assert context.shape == (4, 32)
    expected = token.clone()
    expected[:, 1:5] = context.detach()  # [BOS] V1..V4 [red circle] [EOS]
    with torch.no_grad():
        torch.testing.assert_close(embeddings(input_ids=batch["input_ids"]), expected + position)


def test_coop_initialised_from_the_template_is_zero_shot_clip(model, tokenizer) -> None:
    batch = inputs(tokenizer)
    with torch.no_grad():
        base = model(**batch).logits_per_image
    tuners.apply(model, "coop", num_virtual_tokens=4, init_token_ids=clip.template_token_ids(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits_per_image, base, atol=0, rtol=0)


def test_apply_works_on_a_bare_clip_model_with_its_own_loss(model, tokenizer, tmp_path) -> None:
    batch = inputs(tokenizer)
    tuners.apply(model, "maple", num_virtual_tokens=2, prompt_depth=2)
    out = model(**batch, return_loss=True)
    out.loss.backward()
    assert all(p.grad is not None for _, p in tuners.trainable_parameters(model))
    tuners.save(model, tmp_path)
    fresh = tuners.load(clip.tiny_random_clip(seed=0)[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits_per_image, model(**batch).logits_per_image)


def test_vpt_shallow_appends_tokens_and_pools_the_cls_token(model, tokenizer) -> None:
    pixels = inputs(tokenizer)["pixel_values"]
    with torch.no_grad():
        base_embeddings = model.vision_model.embeddings(pixels)  # (B, 1 + 4 patches, D)
    tuners.apply(model, "vpt", num_virtual_tokens=3)
    prompt = model.vision_model.embeddings.prompt["default"]
    with torch.no_grad():
        tuned = model.vision_model.embeddings(pixels)
        out = model.vision_model(pixel_values=pixels)
    assert tuned.shape == (2, 5 + 3, 32)
    torch.testing.assert_close(tuned[:, :5], base_embeddings)
    torch.testing.assert_close(tuned[:, 5:], prompt.detach().expand(2, -1, -1))
    torch.testing.assert_close(out.pooler_output, model.vision_model.post_layernorm(out.last_hidden_state[:, 0]))
    assert model.vision_model.embeddings.patch_embedding is model.vision_model.embeddings.base_layer.patch_embedding


def test_vpt_deep_gives_every_later_layer_fresh_prompts(tokenizer) -> None:
    model = clip.tiny_random_clip(seed=0, num_layers=3)[0]
    tuners.apply(model, "vpt", num_virtual_tokens=2, deep=True)
    layers = model.vision_model.encoder.layers
    assert isinstance(layers[0], torch.nn.Module) and not isinstance(layers[0], clip_layers.PromptLayer)
    seen = {}
    handles = []
    for i in (1, 2):
        seen[i], handle = capture_inputs(layers[i].base_layer)
        handles.append(handle)
    with torch.no_grad():
        model.vision_model(pixel_values=inputs(tokenizer)["pixel_values"])
    for i in (1, 2):
        torch.testing.assert_close(seen[i][0][:, -2:], layers[i].prompt["default"].detach().expand(2, -1, -1))
    for handle in handles:
        handle.remove()


def test_maple_vision_prompts_are_the_coupled_text_prompts(tokenizer) -> None:
    model = clip.tiny_random_clip(seed=0, num_layers=3)[0]
    tuners.apply(model, "maple", num_virtual_tokens=2, prompt_depth=3)
    text_layers = [model.text_model.embeddings.token_embedding, *model.text_model.encoder.layers[1:]]
    vision_layers = [model.vision_model.embeddings, *model.vision_model.encoder.layers[1:]]
    seen = {}
    for j in (1, 2):
        seen[j], _ = capture_inputs(vision_layers[j].base_layer)
        seen[f"text{j}"], _ = capture_inputs(text_layers[j].base_layer)
    with torch.no_grad():
        model(**inputs(tokenizer))
        for j in (1, 2):
            text_prompt = text_layers[j].prompt["default"]  # P_j (M, d_t)
            coupled = vision_layers[j].coupling["default"](text_prompt)  # F_j(P_j) (M, d_v)
            torch.testing.assert_close(seen[j][0][:, -2:], coupled.expand(2, -1, -1))
            torch.testing.assert_close(seen[f"text{j}"][0][:, 1:3], text_prompt.expand(2, -1, -1))
    assert not vision_layers[0].prompt and not vision_layers[2].prompt  # no free vision prompts in MaPLe


def test_maple_text_prompts_learn_through_the_vision_branch(model, tokenizer) -> None:
    tuners.apply(model, "maple", num_virtual_tokens=2, prompt_depth=2)
    features = model.get_image_features(pixel_values=inputs(tokenizer)["pixel_values"]).pooler_output
    features.sum().backward()  # the image side only: text prompts get gradients through the coupling
    for layer in (model.text_model.embeddings.token_embedding, model.text_model.encoder.layers[1]):
        assert layer.prompt["default"].grad.abs().sum() > 0


def test_coop_and_vpt_run_together_and_switch_by_name(model, tokenizer) -> None:
    batch = inputs(tokenizer)
    with torch.no_grad():
        base = model(**batch).logits_per_image
    tuners.apply(model, "coop", adapter_name="text", num_virtual_tokens=4)
    tuners.apply(model, "vpt", adapter_name="image", num_virtual_tokens=2)
    out = {}
    for names in (["text"], ["image"], ["text", "image"]):
        tuners.set_active(model, names)
        with torch.no_grad():
            out[tuple(names)] = model(**batch).logits_per_image
    assert len({round(float(v.sum()), 5) for v in [base, *out.values()]}) == 4  # each setting differs
    with tuners.disabled(model), torch.no_grad():
        torch.testing.assert_close(model(**batch).logits_per_image, base)


def test_two_active_adapters_on_one_prompt_layer_raise(model, tokenizer) -> None:
    tuners.apply(model, "coop", adapter_name="a", num_virtual_tokens=4)
    tuners.apply(model, "coop", adapter_name="b", num_virtual_tokens=2)
    batch = inputs(tokenizer)
    with torch.no_grad():
        only_b = model(**batch).logits_per_image
        tuners.set_active(model, ["a"])
        only_a = model(**batch).logits_per_image
    assert not torch.allclose(only_a, only_b)
    tuners.set_active(model, ["a", "b"])
    with pytest.raises(MethodError, match="one adapter at a time"):
        model(**batch)


@pytest.mark.parametrize("method, options, message", [
    ("maple", dict(prompt_depth=5), "prompt_depth=5"),
    ("coop", dict(num_virtual_tokens=4, init_token_ids=[4, 19]), "init_token_ids has 2 ids"),
    ("coop", dict(num_virtual_tokens=2, init_token_ids=[4, 10_000]), "must lie in"),
])
def test_bad_options_raise_one_line_method_errors(model, method, options, message) -> None:
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(MethodError, match=message) as error:
        tuners.apply(model, method, **options)
    assert "\n" not in str(error.value)
    assert [name for name, _ in model.named_modules()] == before  # nothing left behind


def test_non_clip_models_and_short_texts_raise(model, tokenizer) -> None:
    with pytest.raises(MethodError, match="CLIP-style model"):
        tuners.apply(testing.tiny_llama(), "vpt")
    tuners.apply(model, "coop", num_virtual_tokens=6)
    short = clip.encode_texts(tokenizer, ["a red circle"])  # 5 tokens: no room for 6 context vectors
    with pytest.raises(MethodError, match="no room for 6 context tokens"):
        model.get_text_features(**short)


def test_learn_prompts_trains_on_base_classes_and_evaluates_both(model, tokenizer) -> None:
    task = protocol.make_task(shots=2, seed=0, test_per_class=2, image_size=16)
    recipe = protocol.PromptRecipe("coop", {"num_virtual_tokens": 4}, steps=3, batch_size=8,
                                   init_from_template=True)
    untouched = copy.deepcopy(model.state_dict())
    tuned, facts = protocol.learn_prompts(model, tokenizer, recipe, task, seed=0)
    assert facts["trainable_parameters"] == 4 * 32 and facts["final_loss"] is not None
    for key, value in model.state_dict().items():  # the pretrained model itself is left alone
        torch.testing.assert_close(value, untouched[key])
    zero_shot = protocol.evaluate(model, tokenizer, task)
    scores = protocol.evaluate(tuned, tokenizer, task)
    assert set(scores) == {"base", "novel", "hm"} and all(0 <= v <= 1 for v in scores.values())
    assert scores != zero_shot or facts["final_loss"] > 0  # trained prompts were used in evaluation
    summary = protocol.summarize([{"name": "CoOp", **scores, **facts}, {"name": "CoOp", **zero_shot, **facts}])
    assert summary["CoOp"]["base"] == pytest.approx((scores["base"] + zero_shot["base"]) / 2)


def test_matrix_builder_is_a_classifier_over_class_prompts() -> None:
    classifier = testing.tiny_clip()
    batch = testing.example_batch(classifier)
    out = classifier(**batch)
    assert out.logits.shape == (2, 4) and out.loss.ndim == 0
    assert isinstance(classifier, clip.ZeroShotClassifier)
    assert classifier.class_input_ids.shape[0] == len(images.class_names()[:4])
