"""What produced a file: package versions, the git commit, the command. Shared by train.py's
config.json and the universal-ID provenance that derive_spatial_ids.py writes."""
import platform
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import torch
import transformers

REPO = Path(__file__).resolve().parent


def _git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def run_metadata():
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
