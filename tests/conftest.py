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


@pytest.fixture
def reproduce_here(capfd, monkeypatch):
    """reproduce.py's main in this process, as `bash reproduce.sh MODEL FLAGS...` runs it
    (--protocol paper --seeds 0 first, the flags after): (exit status, stdout, stderr), its stages'
    processes' output included. Saves a process's imports (torch, scipy, transformers: ~4 s of CPU)
    on the invocations a test does not kill; a test that kills a sweep starts it with reproduce.sh."""
    import reproduce

    def run(model, *flags, env=None):
        for name, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                            **(env or {})}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(Path(reproduce.__file__).parent)  # main changes to the repo; this changes back after
        capfd.readouterr()
        try:
            reproduce.main(["--model", model, "--protocol", "paper", "--seeds", "0", *flags])
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)  # what the interpreter prints on its way out
        out, err = capfd.readouterr()
        return code, out, err

    return run
