"""Print vLLM's requirements without the torch family, for images that keep their own torch.

NVIDIA's PyTorch containers ship their own torch build (a pre-release version such as
``2.13.0a0+...nv``) that vLLM's exact ``torch==`` pin never matches, so the Dockerfile installs
vLLM with ``--no-deps`` and then this list under the image's torch constraint; whether vLLM's
compiled ops load against that torch is checked right after (``import vllm._C``).

    python tools/vllm_requirements.py [distribution]   # default: vllm (installed)
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

#: Built against one torch: the image's own builds are kept (or, for the audio/vision ones, unneeded
#: by text rollouts).
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec", "xformers", "triton"}


def requirements(dist: str = "vllm") -> list[str]:
    """``dist``'s requirements that apply here (markers evaluated, extras dropped), torch family out."""
    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm")))
