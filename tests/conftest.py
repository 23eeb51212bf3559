"""Fixtures shared by every test suite (importable without transformers)."""

import pytest

from phasesplit.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The `tiny` preset, seed 0: a random Llama checkpoint with a trained BPE tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0, preset="tiny")
