"""The image–caption world, the tiny-clip tokenizer and model, contrastive pretraining and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from tunelab.multimodal import clip, images

SMALL = clip.ClipSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, projection_dim=16,
                      steps=2, batch_size=16, eval_per_class=4)


def test_base_and_novel_classes_split_every_attribute_value() -> None:
    split = images.split_classes()
    base, novel = set(split["base"]), set(split["novel"])
    assert len(base) == len(novel) == 12 and not base & novel
    assert base | novel == set(images.class_names())
    for part in (base, novel):  # every colour and every shape occurs among base and among novel classes
        assert {name.split()[0] for name in part} == set(images.COLOURS)
        assert {name.split()[1] for name in part} == set(images.SHAPES)


def test_render_is_deterministic_and_draws_the_shape_in_its_colour() -> None:
    spec = images.ImageSpec("blue", "square", "large", "center")
    style = images.Style(noise=0.0, clutter=False)
    a = images.render(spec, np.random.default_rng(3), style)
    b = images.render(spec, np.random.default_rng(3), style)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    centre = a[:, 16, 16]
    np.testing.assert_allclose(centre, images.RGB["blue"], atol=0.07)  # colour jitter is at most 0.06
    assert not np.array_equal(a, images.render(spec, np.random.default_rng(4), style))
    noisy = images.render(spec, np.random.default_rng(3), images.TASK_STYLE)
    assert noisy.min() >= 0 and noisy.max() <= 1 and np.abs(noisy - a).mean() > 0.05


def test_shape_masks_have_the_expected_areas() -> None:
    radius = 8.0
    areas = {shape: images.shape_mask(shape, 15.5, 15.5, radius).sum() for shape in images.SHAPES}
    assert abs(areas["circle"] - np.pi * radius**2) < 0.1 * np.pi * radius**2
    assert abs(areas["square"] - (2 * 0.85 * radius) ** 2) < 0.15 * (2 * 0.85 * radius) ** 2
    assert abs(areas["triangle"] - 0.5 * 1.8 * radius * 2 * radius) < 0.15 * 1.8 * radius**2
    assert areas["cross"] < areas["square"] and len(set(areas.values())) == 4


def test_sample_images_labels_and_positions() -> None:
    names = images.split_classes()["novel"][:3]
    data = images.sample_images(names, per_class=4, seed=0)
    assert data.pixel_values.shape == (12, 3, 32, 32) and data.pixel_values.min() >= -1
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [spec.class_name for spec in data.specs] == [name for name in names for _ in range(4)]
    again = images.sample_images(names, per_class=4, seed=0)
    np.testing.assert_array_equal(data.pixel_values, again.pixel_values)


def test_captions_use_only_vocabulary_words_and_name_the_attributes() -> None:
    rng = np.random.default_rng(0)
    vocabulary = set(images.vocabulary())
    for _ in range(50):
        spec = images.random_spec(rng)
        text = images.caption(spec, rng)
        assert set(text.split()) <= vocabulary
        assert spec.colour in text.split() and spec.shape in text.split()


def test_tokenizer_wraps_captions_in_bos_and_eos_without_unknowns() -> None:
    tokenizer = clip.build_tokenizer()
    assert tokenizer.eos_token_id == clip.EOS_ID != 2  # 2 would switch CLIP to the legacy argmax pooling
    encoded = clip.encode_texts(tokenizer, ["a photo of a red circle", "a cross"])
    ids = encoded["input_ids"]
    assert ids.shape == (2, 8) and ids[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    assert ids[0, -1] == clip.EOS_ID and ids[1, 3] == clip.EOS_ID and ids[1, 4:].tolist() == [0] * 4
    assert encoded["attention_mask"][1].tolist() == [1] * 4 + [0] * 4
    all_words = " ".join(images.vocabulary())
    assert tokenizer.unk_token_id not in tokenizer(all_words)["input_ids"]
    assert clip.template_token_ids(tokenizer) == tokenizer("a photo of a", add_special_tokens=False)["input_ids"]


def test_text_pooling_picks_the_eos_position() -> None:
    model, tokenizer = clip.tiny_random_clip()
    assert model.config.text_config.eos_token_id == clip.EOS_ID
    encoded = clip.encode_texts(tokenizer, ["a photo of a red circle", "a cross"])
    with torch.no_grad():
        out = model.text_model(**encoded)
    eos_positions = [7, 3]
    for row, position in enumerate(eos_positions):
        torch.testing.assert_close(out.pooler_output[row], out.last_hidden_state[row, position])


def test_contrastive_loss_equals_clip_loss_for_distinct_captions_and_merges_duplicates() -> None:
    model, tokenizer = clip.tiny_random_clip()
    texts = ["a red circle", "a blue cross", "a small green square"]
    batch = clip.encode_texts(tokenizer, texts)
    pixels = torch.from_numpy(images.sample_images(images.class_names()[:3], 1, seed=0, size=16).pixel_values)
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels, return_loss=True)
    ours = clip.contrastive_loss(out.logits_per_text, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(ours, out.loss)  # parity with transformers' CLIP loss
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 3.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # captions 0 and 1 are equal
    by_hand = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(clip.contrastive_loss(logits, torch.tensor([7, 7, 9])), by_hand)


def test_zero_shot_classifier_scores_images_against_class_prompts() -> None:
    model, tokenizer = clip.tiny_random_clip()
    names = images.class_names()[:3]
    classifier = clip.ZeroShotClassifier.from_class_names(model, tokenizer, names)
    assert list(classifier.state_dict()) == ["clip." + key for key in model.state_dict()]
    pixels = torch.from_numpy(images.sample_images(names, 2, seed=0, size=16).pixel_values)
    with torch.no_grad():
        logits = classifier(pixel_values=pixels).logits
        text = clip.encode_texts(tokenizer, [images.CLASS_TEMPLATE.format(name) for name in names])
        expected = model(**text, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(logits, expected)


def test_pretrain_caches_atomically_and_deterministically(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    path = clip.pretrain(seed=0, progress=False, spec=SMALL)
    assert path == tmp_path / "home" / "models" / "tiny-clip"
    report = clip.pretrain_report()
    assert report["steps"] == 2 and 0 <= report["zero_shot_novel_task"] <= 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert clip.pretrain(seed=0, progress=False, spec=SMALL) == path  # cached: no second pretraining
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    other = clip.pretrain(home=tmp_path / "other", seed=0, progress=False, spec=SMALL)
    first, second = CLIPModel.from_pretrained(path), CLIPModel.from_pretrained(other)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)

    from tunelab.models import zoo

    model, tokenizer = zoo.load("tiny-clip", progress=False)  # the cached model (task does not apply)
    assert isinstance(model, CLIPModel) and tokenizer.eos_token_id == clip.EOS_ID
    assert "tiny-clip" in zoo.PRESETS


def test_cli_pretrain_reports_the_cached_tiny_clip(tmp_path, monkeypatch, capsys) -> None:
    from tunelab.cli import main

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    clip.pretrain(seed=0, progress=False, spec=SMALL)  # cached: the CLI reads it instead of pretraining
    assert main(["pretrain", "tiny-clip"]) == 0
    out = capsys.readouterr().out
    report = clip.pretrain_report()
    assert "tiny-clip:" in out and f"{report['parameters']:,} parameters" in out
    assert f"novel {report['zero_shot_novel_task']:.3f}" in out
    assert main(["pretrain", "tiny-bert"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: unknown tiny preset 'tiny-bert'") and "tiny-clip" in error and "\n" not in error


@pytest.mark.parametrize("shots", [2])
def test_protocol_task_holds_base_training_and_both_test_sets(shots: int) -> None:
    from tunelab.multimodal import protocol

    task = protocol.make_task(shots=shots, seed=1, test_per_class=3, image_size=16)
    assert len(task.train) == 12 * shots and task.train.class_names == task.base_classes
    assert task.test_novel.class_names == task.novel_classes and len(task.test_novel) == 36
    assert protocol.harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2)
    assert protocol.harmonic_mean(0.0, 0.0) == 0.0
