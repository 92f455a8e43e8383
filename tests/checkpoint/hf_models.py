"""Tiny random Hugging Face MoE models for the conversion tests (built locally, nothing downloaded).

Every tensor is random, norms included (1 + noise), so swapping any two tensors of the same
shape (q_norm/k_norm, gate/up, two experts) changes the weights and the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, tie_word_embeddings=False)


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if "norm" in name else 0.2)
            p.copy_(1 + noise if "norm" in name else noise)


def _save(model, out: Path, seed: int, dtype) -> Path:
    _randomize(model, seed)
    model.to(dtype).save_pretrained(str(out))
    return out


def make_qwen3(out: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Qwen3-MoE: GQA 4/2 with explicit head_dim 16 != 32/4, q/k norms, 4 experts, norm_topk_prob as given."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TINY, "intermediate_size": 64, "moe_intermediate_size": 16, "head_dim": 16,
                            "num_experts": 4, "norm_topk_prob": True, **overrides})
    return _save(Qwen3MoeForCausalLM(cfg), out, seed, dtype)


def make_mixtral(out: Path, seed: int = 1, dtype=torch.float32, **overrides) -> Path:
    """Mixtral: GQA 4/2, head_dim 8, 4 experts, renormalised top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**{**TINY, "intermediate_size": 16, "num_local_experts": 4, **overrides})
    return _save(MixtralForCausalLM(cfg), out, seed, dtype)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory (small test models only)."""
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def expert_mismatches(experts: dict, hf: dict[str, torch.Tensor], arch) -> list[str]:
    """Problems with megatron experts ``{(layer, e): (fc1, fc2)}`` against HF tensors: missing, misplaced, duplicated."""
    from megatron_vp2o.checkpoint.hf import keys

    problems = []
    layers = sorted({L for L, _ in experts})
    n_experts = sum(1 for k in hf if k.startswith("model.layers.0.") and k.endswith(f".{arch.down}.weight"))
    for L in layers:
        for e in range(n_experts):
            if (L, e) not in experts:
                problems.append(f"layer {L} expert {e} missing")
                continue
            fc1, fc2 = experts[(L, e)]
            want1 = keys.fuse_fc1(hf[arch.hf("gate", L, e)], hf[arch.hf("up", L, e)])
            if not (torch.equal(fc1, want1) and torch.equal(fc2, hf[arch.hf("down", L, e)])):
                problems.append(f"layer {L} expert {e} holds other weights")
        fc1s = [experts[(L, e)][0] for e in range(n_experts) if (L, e) in experts]
        if any(torch.equal(a, b) for i, a in enumerate(fc1s) for b in fc1s[i + 1:]):
            problems.append(f"layer {L}: two experts have identical weights")
    return problems
