import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Modules in the order they start under `make test` (pytest-xdist, `--dist loadscope`: each module
# runs whole on one worker, so its module fixtures are built once): the heaviest first, by their
# measured CPU seconds on the 2-core machine (2026-12-03: test_sweeps ~110, test_runs 60,
# test_reproduce 35, ...; 2026-12-06, loaded: test_preemption ~40 with its two-process agent
# test), so that no long module starts last while the other worker idles. A module not listed
# starts after these, in file order. This changes only when a test runs, never what it checks;
# refresh it from `make test`'s slowest-tests list when a module grows.
# test_slurm mostly waits (70-150 s) while its jobs run in the cluster's own processes: it starts first.
HEAVIEST_FIRST = ("test_slurm.py", "test_sweeps.py", "test_runs.py", "test_preemption.py", "test_reproduce.py",
                  "test_signals.py", "test_bad_inputs.py", "test_run_identity.py",
                  "test_id_diagnostics.py", "test_gpu_paths.py", "test_learning.py", "test_tiny_spatial.py",
                  "test_seeds_and_reporting.py", "test_train.py", "test_spatial_optimisation.py",
                  "test_perf_paths.py", "test_families.py", "test_grid_sources.py", "test_protocols.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within a module


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


@pytest.fixture(scope="session")
def sensitive(tiny_path):
    """The tiny model with every LM matrix scaled by 10: at its random init the tiny model says
    much the same whatever it is asked, so a padding mistake could go unseen; scaled, its answers
    differ from question to question (and top-1 logits stay ~200x further apart than batching
    moves them). Read only."""
    import torch

    import models

    model, processor, adapter = models.load_model_and_processor("tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "visual" not in name:
                param.mul_(10.0)
    return model, processor, adapter


@pytest.fixture
def tiny(tiny_path):
    """A fresh (model, processor, adapter) of the built-in tiny model; tests may modify it."""
    import models

    return models.load_model_and_processor("tiny")


@pytest.fixture
def model_must_not_load(monkeypatch):
    """eval_coco's checkpoint loading made to fail: the test shows its data check ran before a model loads."""
    import eval_coco

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(eval_coco, "load_checkpoint_model", no_model)
    monkeypatch.setattr(eval_coco, "check_checkpoint_source", no_model)


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


@pytest.fixture(scope="session")
def three_object_grid(tmp_path_factory):
    """A small training set shared by the run tests: 90 grid images of three built-in objects (3
    pairs) in `grid/`, a 6-question COCO-Spatial stand-in in `standin/`. Read only."""
    import make_grid_data

    root = tmp_path_factory.mktemp("three_object_grid")
    objects = make_grid_data.builtin_objects(64)
    names = ("red circle", "blue square", "green triangle")
    make_grid_data.make_grid_images(root / "grid", {n: objects[n] for n in names}, cell=28, sizes=(124,),
                                    max_pairs=3, max_images=90, seed=0, progress=False)
    make_grid_data.make_coco_standin(root / "standin", objects, n=6, seed=0)
    return root


@pytest.fixture
def kill_at_line():
    """kill_at_line(cmd, prefix, cwd, env): start `cmd` in a process group of its own, SIGKILL the
    whole group (its children too) as soon as it prints a line starting with `prefix`; returns
    (its exit status, the lines it printed)."""
    import signal
    import subprocess

    def run(cmd, prefix, cwd, env):
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
        return proc.returncode, seen

    return run


@pytest.fixture(scope="session")
def trained_steps():
    """trained_steps(run folder): the last step its metrics.jsonl logs as trained; 0 before the
    first, and while the file is missing or its last line half-written (a test polls it while the
    run writes)."""
    import json

    def steps(run):
        try:
            events = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError):
            return 0
        return max((e["step"] for e in events if e["event"] == "train"), default=0)

    return steps


@pytest.fixture(scope="session")
def preempted_then_resumed():
    """preempted_then_resumed(run folder): asserts that the run was stopped once by SIGTERM at a
    saved step, resumed from that step and ended; returns that step."""
    import json

    def check(run):
        events = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        preempted = [e for e in events if e["event"] == "preempted"]
        assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM", preempted
        assert events[-1]["event"] == "end"
        assert json.loads((Path(run) / "config.json").read_text())["resumed"][0]["step"] == preempted[0]["step"]
        return preempted[0]["step"]

    return check


@pytest.fixture
def train_here():
    """train_here(argv): train.py's main in the test's own process, with one torch thread as the runs
    started in a process of their own get (OMP_NUM_THREADS=1): the same arithmetic to the last bit,
    without the 3 or so CPU seconds of a new process's imports. Returns what main returns."""
    import torch

    import train

    def run(argv):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train.main(list(argv))
        finally:
            torch.set_num_threads(threads)

    return run
