"""Supported Hugging Face MoE architectures: tensor names and config mapping to our ModelConfig.

One :class:`Arch` per ``model_type``; an unknown architecture or an unsupported config flag raises
:class:`ConversionError` listing what is supported (a converter that silently ignores a flag it
does not implement produces a model that loads but computes something else).

Config mapping (HF field -> ``ModelConfig``), the same for both architectures unless noted:

* ``num_local_experts`` / ``num_experts`` -> ``num_experts``; ``num_experts_per_tok`` -> ``moe_router_topk``
* router: softmax scores; top-k normalisation: Mixtral always renormalises the top-k gates
  (``topk_normalize=True``); Qwen3-MoE follows ``norm_topk_prob`` (False = softmax over all experts,
  then top-k without renormalising, megatron ``moe_router_pre_softmax=True``).
  ``router_aux_loss_coef`` -> ``router.aux_loss_coeff`` (training only; no effect on logits).
* ``rope_parameters.rope_theta`` (or v4 ``rope_theta``) -> ``rotary_base``; only ``rope_type=default``.
* ``rms_norm_eps`` -> ``norm_eps``; ``head_dim`` (explicit in Qwen3) -> ``head_dim``;
  ``qk_layernorm``: Qwen3 True, Mixtral False; ``tie_word_embeddings`` -> ``not untie_embeddings``.
* ``moe_intermediate_size`` (Qwen3) or ``intermediate_size`` (Mixtral) -> ``moe_ffn_hidden_size``.
* ``dtype``/``torch_dtype``: float32 -> fp32, bfloat16 -> bf16 (others: pass ``--dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_vp2o.config import ConfigError, ModelConfig, RouterConfig


class ConversionError(ConfigError):
    """A conversion problem with a message that names the input and the fix."""


@dataclass(frozen=True)
class Arch:
    model_type: str
    hf_class: str  # ``architectures[0]`` of config.json
    moe_prefix: str  # MoE block under model.layers.{L}.
    gate: str  # per expert: gate / up / down projection names
    up: str
    down: str
    qk_norm: bool
    # flags that must hold (HF field -> allowed values; a missing field counts as the first value)
    required: dict = field(default_factory=dict)

    def hf(self, kind: str, layer: int | None = None, expert: int | None = None) -> str:
        """HF tensor name of ``kind`` (see :data:`_NAMES`)."""
        moe = f"model.layers.{layer}.{self.moe_prefix}"
        names = {
            "router": f"{moe}.gate.weight",
            "gate": f"{moe}.experts.{expert}.{self.gate}.weight",
            "up": f"{moe}.experts.{expert}.{self.up}.weight",
            "down": f"{moe}.experts.{expert}.{self.down}.weight",
        }
        if kind in names:
            return names[kind]
        return _NAMES[kind].format(L=layer)


_NAMES = {
    "embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight", "final_norm": "model.norm.weight",
    "input_norm": "model.layers.{L}.input_layernorm.weight",
    "post_norm": "model.layers.{L}.post_attention_layernorm.weight",
    "q": "model.layers.{L}.self_attn.q_proj.weight", "k": "model.layers.{L}.self_attn.k_proj.weight",
    "v": "model.layers.{L}.self_attn.v_proj.weight", "o": "model.layers.{L}.self_attn.o_proj.weight",
    "q_norm": "model.layers.{L}.self_attn.q_norm.weight", "k_norm": "model.layers.{L}.self_attn.k_norm.weight",
}

_COMMON = {"hidden_act": ("silu",), "rope_scaling": (None,), "attention_bias": (False,), "mlp_bias": (False,)}
ARCHS = {
    "qwen3_moe": Arch("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", "gate_proj", "up_proj", "down_proj", True,
                      dict(_COMMON, use_sliding_window=(False,), decoder_sparse_step=(1,), mlp_only_layers=([],),
                           shared_expert_intermediate_size=(None, 0))),
    "mixtral": Arch("mixtral", "MixtralForCausalLM", "block_sparse_moe", "w1", "w3", "w2", False,
                    dict(_COMMON, sliding_window=(None,), router_jitter_noise=(0.0, 0))),
}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def get_arch(model_type: str | None) -> Arch:
    if model_type not in ARCHS:
        raise ConversionError(f"unsupported architecture model_type={model_type!r}; supported: {sorted(ARCHS)} "
                              f"({', '.join(a.hf_class for a in ARCHS.values())})")
    return ARCHS[model_type]


_REQUIRED = object()
# our ModelConfig field -> the HF config.json key it comes from (to name the key in range errors)
_HF_KEYS = {"norm_eps": "rms_norm_eps", "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
            "num_query_groups": "num_key_value_heads", "head_dim": "head_dim", "moe_router_topk": "num_experts_per_tok",
            "num_experts": "num_local_experts/num_experts", "moe_ffn_hidden_size": "moe_intermediate_size",
            "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size", "seq_length": "max_position_embeddings",
            "rotary_base": "rope_theta", "aux_loss_coeff": "router_aux_loss_coef", "hidden_size": "hidden_size"}
_KINDS = {"int": "a positive integer", "count": "an integer >= 0", "float": "a finite number",
          "bool": "true or false", "str": "a string", "dict": "a JSON object"}


def _read(hf: dict, key: str, kind: str, default=_REQUIRED, where: str = ""):
    """``hf[key]`` checked against ``kind`` (see _KINDS); a missing required key or a wrong-typed value
    is a one-line ConversionError naming the key. ``None`` counts as absent."""
    import math

    name = f"{where}{key}"
    value = hf.get(key) if isinstance(hf, dict) else None
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"config.json: missing key '{name}' ({_KINDS[kind]}); add it to config.json")
        return default
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict)}[kind](value)
    if not ok:
        raise ConversionError(f"config.json: key '{name}' must be {_KINDS[kind]}, got {value!r} "
                              f"({type(value).__name__}); fix it in config.json")
    return value


def _rope(hf: dict) -> float:
    params = _read(hf, "rope_parameters", "dict", {})
    rope_type = _read(params, "rope_type", "str", "default", "rope_parameters.")
    if rope_type != "default":
        raise ConversionError(f"unsupported rope_parameters.rope_type={rope_type!r}; supported: ['default']")
    theta = _read(params, "rope_theta", "float", None, "rope_parameters.")
    theta = _read(hf, "rope_theta", "float", 10000.0) if theta is None else theta
    if float(theta) != int(theta):
        raise ConversionError(f"rope_theta={theta} must be an integer (model.rotary_base is an int)")
    return int(theta)


def check_flags(arch: Arch, hf: dict) -> None:
    """Raise on any config flag whose value we do not convert faithfully."""
    bad = [f"{k}={hf[k]!r} (supported: {list(ok)})" for k, ok in arch.required.items()
           if k in hf and hf[k] not in ok]
    if bad:
        raise ConversionError(f"{arch.hf_class}: unsupported config flag(s): {'; '.join(bad)}")


def model_config_from_hf(hf: dict, dtype: str | None = None, expert_impl: str = "sequential") -> tuple[Arch, ModelConfig]:
    """(architecture, our ModelConfig) for an HF ``config.json`` dict; raises on unsupported flags."""
    arch = get_arch(hf.get("model_type"))
    check_flags(arch, hf)
    expert_key = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"
    experts = _read(hf, expert_key, "count", 0)
    if not experts:
        raise ConversionError(f"{arch.hf_class}: config has no experts (num_experts={experts}); only MoE models convert")
    dtype_key = "dtype" if hf.get("dtype") is not None else "torch_dtype"
    hf_dtype = _read(hf, dtype_key, "str", "float32").replace("torch.", "")
    if dtype is None and hf_dtype not in _DTYPES:
        raise ConversionError(f"config.json key '{dtype_key}': checkpoint dtype {hf_dtype!r} has no matching "
                              f"params_dtype; supported: "
                              f"{sorted(_DTYPES)} or pass --dtype fp32|bf16")
    moe_ffn = _read(hf, "moe_intermediate_size" if arch.model_type == "qwen3_moe" else "intermediate_size", "int")
    heads = _read(hf, "num_attention_heads", "int")
    topk_norm = True if arch.model_type == "mixtral" else _read(hf, "norm_topk_prob", "bool", False)
    try:
        cfg = ModelConfig(
            num_layers=_read(hf, "num_hidden_layers", "int"), hidden_size=_read(hf, "hidden_size", "int"),
            num_attention_heads=heads, num_query_groups=_read(hf, "num_key_value_heads", "int", heads),
            head_dim=_read(hf, "head_dim", "int", None), num_experts=experts,
            moe_router_topk=_read(hf, "num_experts_per_tok", "int"), moe_ffn_hidden_size=moe_ffn,
            ffn_hidden_size=_read(hf, "intermediate_size", "int", moe_ffn), vocab_size=_read(hf, "vocab_size", "int"),
            seq_length=_read(hf, "max_position_embeddings", "int", 4096),
            norm_eps=float(_read(hf, "rms_norm_eps", "float", 1e-6)), rotary_base=_rope(hf),
            qk_layernorm=arch.qk_norm, untie_embeddings=not _read(hf, "tie_word_embeddings", "bool", False),
            swiglu=True, expert_impl=expert_impl, params_dtype=dtype or _DTYPES[hf_dtype],
            router=RouterConfig(score_function="softmax", topk_normalize=topk_norm, aux_loss_type="aux_loss",
                                aux_loss_coeff=float(_read(hf, "router_aux_loss_coef", "float", 0.001))),
        )
    except ValueError as exc:  # ModelConfig's own range checks (e.g. top-k above the expert count)
        if isinstance(exc, ConversionError):
            raise
        msg = str(exc).splitlines()[0]
        keys = [hf_key for ours, hf_key in _HF_KEYS.items() if ours in msg]
        named = f"key '{keys[0]}'" if keys else "its values"
        raise ConversionError(f"config.json: {named} gives {msg}; fix it in config.json") from None
    return arch, cfg


def hf_config_from_model(arch: Arch, m: ModelConfig, base: dict | None = None) -> dict:
    """An HF ``config.json`` dict for ``m`` (non-architectural fields of ``base`` are kept)."""
    out = {k: v for k, v in (base or {}).items() if k not in ("transformers_version", "_name_or_path")}
    if m.shared_expert_ffn_hidden_size or m.moe_layer_freq != 1 or not m.swiglu or m.router.score_function != "softmax":
        raise ConversionError("only all-MoE models with softmax routers, gated SiLU experts and no shared expert "
                              f"export to {arch.hf_class}")
    head_dim = m.resolved_head_dim
    out.update(
        architectures=[arch.hf_class], model_type=arch.model_type, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=head_dim, num_experts_per_tok=m.moe_router_topk,
        vocab_size=m.vocab_size, max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_theta": float(m.rotary_base), "rope_type": "default"},
        tie_word_embeddings=not m.untie_embeddings, hidden_act="silu",
        router_aux_loss_coef=m.router.aux_loss_coeff,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[m.params_dtype],
    )
    if "head_dim" in (base or {}) and base["head_dim"] is None and head_dim * m.num_attention_heads == m.hidden_size:
        out["head_dim"] = None  # Mixtral's implicit default stays implicit
    out.pop("rope_theta", None)
    out.pop("torch_dtype", None)
    if arch.model_type == "qwen3_moe":
        experts_key = "num_local_experts" if "num_local_experts" in out else "num_experts"  # v5 / v4 spelling
        out.update({experts_key: m.num_experts}, moe_intermediate_size=m.moe_ffn_hidden_size,
                   intermediate_size=out.get("intermediate_size", m.ffn_hidden_size),
                   norm_topk_prob=m.router.topk_normalize, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        if not m.router.topk_normalize:
            raise ConversionError("Mixtral always renormalises the top-k gates; model.router.topk_normalize must be true")
        out.update(num_local_experts=m.num_experts, intermediate_size=m.moe_ffn_hidden_size)
    return out
