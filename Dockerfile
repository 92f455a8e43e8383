# megatron-vp2o on an NGC PyTorch image (CUDA, NCCL, Transformer Engine, apex included).
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /opt/megatron-vp2o
COPY . .
# Keep the image's torch: pin the installed version as a pip constraint.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir -c /tmp/torch-constraint.txt -e ".[rewards]" \
 && apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["vp2o"]
