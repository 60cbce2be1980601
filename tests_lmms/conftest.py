"""The lmms-eval tier runs from .cache/lmms-venv (`make test-lmms`); the project's modules are
imported from the repository root, as in tests/."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
