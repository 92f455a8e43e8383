# megatron-vp2o on NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine, apex; Python 3.12).
# Pinned: the image tag and the megatron-core release tested with the project (make test-latest;
# see megatron_vp2o/compat.py for the supported range).
#   docker build -t megatron-vp2o .
#   docker run --gpus all --ipc=host -v $PWD/runs:/runs megatron-vp2o train --config examples/configs/tiny_cpu.yaml --out /runs/rl
#   docker run --gpus all --ipc=host --entrypoint python megatron-vp2o tools/gpu_check.py   # the GPU acceptance check
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}
ARG MCORE_VERSION=0.19.2
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
ENTRYPOINT ["vp2o"]
CMD ["--help"]
