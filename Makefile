# make demo : offline end-to-end demo on the built-in tiny model (no GPU, no downloads)
# make test : the test suite (every test, on every core: pytest-xdist, one OpenMP thread per worker)
# make test-fast : the edit loop's tier (tests marked `fast`, under a minute); CI runs `make test`
# make study: the sandbox's dose-response on tiny-spatial (21 runs, 2 at a time; study.sh)
# make test-lmms : the opt-in lmms-eval tier (not part of `make test`): .cache/lmms-venv, built once
#   on top of .venv from requirements-lmms.txt, runs one lmms-eval task offline on the tiny model
# Both create (or reuse) .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# One OpenMP thread: on the 2-core machines here two threads made the tiny model's small matrix
# products 40x slower (0.4 ms -> 16 ms each; a training step 0.2 s -> 15 s while the other core was
# busy). Override with `make test OMP_NUM_THREADS=2`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

# Test workers: one per core (`make test TEST_WORKERS=1` runs them in one process, in order).
TEST_WORKERS ?= auto

.PHONY: install test test-fast test-lmms demo study gpu-dry-run clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -q -rs -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

test-fast: install
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) -m fast

# lmms-eval's own environment: .venv's packages (torch, transformers: pinned there) seen through a
# .pth file, lmms-eval and what it adds installed beside them, never into .venv.
LMMS_VENV ?= .cache/lmms-venv
LMMS_PY := $(LMMS_VENV)/bin/python
$(LMMS_VENV)/.installed: requirements-lmms.txt $(VENV)/.installed
	test -x $(LMMS_PY) || python3 -m venv $(LMMS_VENV)
	$(LMMS_PY) -c "import site, sys; open(site.getsitepackages()[0] + '/project-venv.pth', 'w').write(sys.argv[1] + '\n')" \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	# PyPI's torchvision is built against PyPI's torch (a CUDA build, which runs on a CPU too), not
	# against a CPU build of torch (.venv's on the dev machines: "operator torchvision::nms does not
	# exist"): this environment gets PyPI's torch of .venv's version, and .venv's transformers,
	# tokenizers and accelerate as constraints (unpinned, pip took torch 2.14 for the newest torchvision).
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(LMMS_VENV)/constraints.txt
	$(PY) -m pip freeze | grep -iE '^(transformers|tokenizers|accelerate)==' >> $(LMMS_VENV)/constraints.txt
	PIP_FIND_LINKS= $(LMMS_PY) -m pip install -q --ignore-installed -c $(LMMS_VENV)/constraints.txt torch
	PIP_FIND_LINKS= $(LMMS_PY) -m pip install -q -r requirements-lmms.txt -c $(LMMS_VENV)/constraints.txt
	touch $@

test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_PY) -m pytest tests_lmms -q -p no:cacheprovider

# every step of bench/gpu_check.sh on this CPU at tiny size (docs/performance.md)
gpu-dry-run: install
	PYTHON=$(PY) bash bench/gpu_check.sh --dry-run

demo: install
	PYTHON=$(PY) bash demo.sh

study: install
	PYTHON=$(PY) bash study.sh

clean:
	rm -rf .cache data/grid data/grid_holdout data/coco_standin data/demo_grid data/demo_extraction data/demo_coco_standin runs/demo_* runs/compare_demo_* runs/study_tiny-spatial data/study_coco_standin embeds/universal_id_90/tiny.pt embeds/universal_id_90/tiny.json embeds/universal_id_90/tiny_?_axis.pt embeds/universal_id_90/tiny-warm.pt embeds/universal_id_90/tiny-warm.json embeds/universal_id_90/tiny-warm_?_axis.pt embeds/universal_id_90/tiny-spatial.pt embeds/universal_id_90/tiny-spatial.json embeds/universal_id_90/tiny-spatial_?_axis.pt
