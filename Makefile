# The two commands of the README:
#   make demo   the main job: VP2O RL of the tiny MoE on CPU     make test   the test suite
# Both create .venv and install what is missing. An existing torch is never replaced: with no
# torch, torch==2.13.0 (a local CPU build on our machines) is installed first, and the installed
# torch version is passed to every later pip call as a constraint.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vp2o-installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo compare test bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,rewards]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf runs/demo
	$(VENV)/bin/vp2o train --config examples/configs/tiny_cpu.yaml --out runs/demo $(ARGS)

compare: install
	$(PY) tools/compare_algos.py $(ARGS)

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_algo.py --quick
	$(PY) bench/bench_step.py --quick --threads 1
	$(PY) bench/bench_rollout.py --quick --threads 1

clean:
	rm -rf runs build *.egg-info
