import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def tiny_path():
    import models

    return models.ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_ro(tiny_path):
    """One unmodified (model, processor, adapter) of the tiny model, shared by every test that only
    reads it (a test that changes weights, hooks or requires_grad takes `tiny`)."""
    import models

    return models.load_model_and_processor("tiny")


@pytest.fixture
def tiny(tiny_path):
    """A fresh (model, processor, adapter) of the built-in tiny model; tests may modify it."""
    import models

    return models.load_model_and_processor("tiny")
