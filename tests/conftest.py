"""Shared fixtures: an isolated $TUNELAB_HOME, the pretrained tiny-llama, a small saved model, ../shared."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    # Never read or write the user's real cache from tests. TUNELAB_TEST_HOME lets a developer reuse
    # one pretrained cache across test sessions; by default every session pretrains from scratch.
    home = os.environ.get("TUNELAB_TEST_HOME") or tempfile.mkdtemp(prefix="tunelab-test-home-")
    os.environ["TUNELAB_HOME"] = home
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Tiny models run 10-50x faster on one thread than on two contending ones; the tests that train a
    # real-size preset raise it temporarily (see pretrained_tiny_llama).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


@pytest.fixture(scope="session")
def pretrained_tiny_llama() -> Path:
    """The real tiny-llama preset, pretrained once per session (about two minutes on 2 cores)."""
    import torch

    from tunelab.models import tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return tiny.pretrain("tiny-llama", progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A small *random* Llama + a BPE tokenizer fitted on the built-in corpus, saved like a HF model."""
    from tunelab.data import synthetic
    from tunelab.models import tiny

    path = tmp_path_factory.mktemp("small-llama")
    tokenizer = tiny.train_tokenizer(synthetic.corpus(domains=synthetic.DOMAINS, n_documents=300, seed=0), 600)
    spec = tiny.TinySpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = tiny.build_model(spec, tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
