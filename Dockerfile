# megatron-vp2o on NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine, apex; Python 3.12).
# Pinned: the image tag and the megatron-core release tested with the project (make test-latest;
# see megatron_vp2o/compat.py for the supported range).
#   docker build -t megatron-vp2o .
#   docker run --gpus all --ipc=host -v $PWD/runs:/runs megatron-vp2o train --config examples/configs/tiny_cpu.yaml --out /runs/rl
#   docker run --gpus all --ipc=host --entrypoint python megatron-vp2o tools/gpu_check.py   # the GPU acceptance check
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}
ARG MCORE_VERSION=0.19.2
# vLLM for rollouts (rl.engine=vllm), pinned with setup.py's `vllm` extra. vLLM's wheel pins an exact
# torch (0.32.0: torch 2.13.0) that the container's own torch build never matches by version string,
# so vLLM goes in with --no-deps, its other requirements under the image's constraints
# (tools/vllm_requirements.py), and `import vllm._C` checks that its compiled ops load against this
# torch: with a base image whose torch is not the 2.13 line the build stops there, saying so. Build
# without it (rollouts on rl.engine=megatron) with --build-arg WITH_VLLM=0.
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
   || { echo "vLLM ${VLLM_VERSION} does not load against this image's torch ($(python -c 'import torch; print(torch.__version__)')): use a BASE_IMAGE with torch 2.13, or --build-arg WITH_VLLM=0" >&2; exit 1; }; \
    fi
ENTRYPOINT ["vp2o"]
CMD ["--help"]
