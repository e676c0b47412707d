from __future__ import annotations

import pytest

from service.engine.tokenizer import Tokenizer
from service.engine.weights import default_model_path


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2, from its GGUF)."""
    return Tokenizer.load(default_model_path())
