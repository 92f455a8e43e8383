"""Hugging Face MoE checkpoints <-> megatron dist checkpoints (the procedures behind ``vp2o convert``).

* :func:`import_hf` runs on every rank of a (torchrun) world with the requested TP/PP/EP: it
  validates the HF directory (config flags, every expected tensor present with its shape, shards
  complete) before anything is created, builds this rank's megatron model stage, fills each
  parameter's local shard from HF tensors read lazily, and saves a reshardable dist checkpoint
  through :func:`megatron_vp2o.checkpoint.save_checkpoint` into a temporary directory that is
  renamed to ``--out`` only after the optional verification passed.
  VP2O prototypes (persistent per-expert buffers, not HF tensors) are recomputed from the
  imported weights with 30 power steps, so VP2O training loads the checkpoint strictly.
* :func:`verify_logits` loads the saved checkpoint into a fresh fp32 model and compares its
  logits on random tokens with transformers' model of the HF directory (max |diff| <= tol).
* :func:`export_hf` loads a dist checkpoint (any saved layout) with TP=PP=EP=1 and streams HF
  tensors into safetensors shards with an index and ``config.json``.

Memory: import holds one rank's model shard plus the HF tensor being read; export holds the
model plus one output shard; verification frees the megatron model before loading HF's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_vp2o.device import device
from megatron_vp2o.checkpoint.hf import archs, io, mapping, stream
from megatron_vp2o.config import Config, build, to_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    from megatron_vp2o.distributed.init import world_size_from_env

    return dist.get_world_size() if dist.is_initialized() else world_size_from_env()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_config(model_cfg, tp=1, pp=1, ep=1, etp=None, world: int = 1) -> Config:
    """A Config for conversion worlds (one sequence per data-parallel rank; no training)."""
    dp = max(1, world // (tp * pp))
    return build(Config, {"model": dataclasses.asdict(model_cfg),
                          "parallel": dict(tp=tp, pp=pp, ep=ep, etp=etp, distributed_optimizer=False),
                          "train": dict(micro_batch_size=1, global_batch_size=dp)})


def prepare_import(hf_dir, dtype=None, expert_impl="sequential"):
    """Validate an HF directory: (reader, arch, ModelConfig). Raises ConversionError, touches nothing."""
    reader = io.HFReader(hf_dir)
    arch, model_cfg = archs.model_config_from_hf(reader.config, dtype=dtype, expert_impl=expert_impl)
    mapping.check_hf_tensors(reader.shapes, mapping.expected_hf_shapes(arch, model_cfg), f"'{hf_dir}'")
    return reader, arch, model_cfg


def start_world(cfg: Config):
    """(Re)initialise megatron's parallel state for ``cfg`` in the current process group."""
    from megatron.core import parallel_state

    from megatron_vp2o.distributed.init import init_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_parallel(cfg)


def build_model(cfg: Config, with_prototypes: bool = False):
    """This rank's model stage; ``with_prototypes``: VP2O MoE layers (persistent ``protos_XD`` buffers)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_vp2o.model.builder import build_gpt, transformer_config

    layer_cls = MoELayer
    if with_prototypes:
        from megatron_vp2o.moe.layer import vp2o_moe_layer

        layer_cls = vp2o_moe_layer(cfg.vp2o.specialization)
    tconf = transformer_config(cfg.model, cfg.parallel, perform_initialization=False)
    return build_gpt(cfg.model, tconf, moe_layer_cls=layer_cls)


@torch.no_grad()
def recompute_prototypes(model, cfg: Config) -> int:
    """VP2O prototypes from the imported expert weights (``init_power_iters`` = 30 power steps, the
    same deterministic start as training's ``init_vp2o``); returns the number of layers set."""
    from megatron_vp2o.distributed.reductions import VP2OGroups, refresh_prototypes
    from megatron_vp2o.moe.layer import vp2o_layers

    layers = vp2o_layers(model)
    groups = VP2OGroups.from_parallel_state(cfg.parallel.use_sequence_parallel)
    refresh_prototypes(layers, groups, cfg.vp2o.stein.init_power_iters, from_start=True)
    return len(layers)


def shards_of(model, cfg: Config) -> mapping.Shards:
    """Where this rank's parameters sit in the full model (layers, experts, TP/ETP ranks)."""
    from megatron.core import parallel_state as ps

    from megatron_vp2o.model.builder import padded_vocab_size

    layers = list(model.decoder.layers)
    m = cfg.model
    return mapping.Shards(
        layer_offset={i: layer.layer_number - 1 for i, layer in enumerate(layers)},
        expert_offset={i: list(layer.mlp.local_expert_indices) for i, layer in enumerate(layers)
                       if hasattr(layer.mlp, "local_expert_indices")},
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        padded_vocab=padded_vocab_size(m.vocab_size, ps.get_tensor_model_parallel_world_size()),
        num_heads=m.num_attention_heads, num_groups=m.num_query_groups,
        head_dim=m.resolved_head_dim, tied=not m.untie_embeddings)


@torch.no_grad()
def fill_from_hf(model, cfg: Config, arch, reader) -> int:
    """Copy every parameter's local shard from HF tensors; returns the number of parameters filled."""
    sh = shards_of(model, cfg)
    n = 0
    for name, param in model.named_parameters():
        local = mapping.mcore_from_hf(name, arch, reader.get, sh)
        if tuple(local.shape) != tuple(param.shape):
            raise archs.ConversionError(f"'{name}': HF tensors give shape {list(local.shape)} but this rank's "
                                        f"parameter is {list(param.shape)} (config and weights disagree)")
        param.copy_(local)
        n += 1
    return n


def import_hf(hf_dir, out, tp=1, pp=1, ep=1, etp=None, dtype=None, verify=False, tol=1e-4, seed=0) -> dict:
    """Collective: convert ``hf_dir`` into a dist checkpoint at ``out``; returns a summary (rank 0's)."""
    from megatron_vp2o.checkpoint import save_checkpoint

    reader, arch, model_cfg = prepare_import(hf_dir, dtype=dtype)
    io.check_output_dir(out)
    world = _world()
    cfg = world_config(model_cfg, tp, pp, ep, etp, world)
    start_world(cfg)
    summary = {"arch": arch.model_type, "layout": dict(tp=tp, pp=pp, ep=ep, world=world)}
    owner = _rank() == 0
    with io.atomic_dir(out, owner=owner) as tmp:
        _barrier()
        model = build_model(cfg, with_prototypes=True)
        summary["params_filled_rank0"] = fill_from_hf(model, cfg, arch, reader)
        summary["prototype_layers"] = recompute_prototypes(model, cfg)
        meta = {"kind": "hf-import", "config": to_dict(cfg), "world_size": world,
                "hf": {"arch": arch.model_type, "config": reader.config, "source": str(Path(hf_dir).resolve())}}
        save_checkpoint(tmp, 0, SimpleNamespace(models=[model]), meta, with_optimizer=False)
        del model
        if verify:
            summary["max_logit_diff"] = verify_logits(tmp, hf_dir, cfg, seed=seed)
            if not summary["max_logit_diff"] <= tol:
                raise archs.ConversionError(f"verification failed: max logit diff {summary['max_logit_diff']:.3e} > "
                                            f"{tol:g}; the output was not written")
        _barrier()
    _barrier()
    return summary


def megatron_logits(model, ids_BS: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 logits [B, S, vocab] of a plain forward (pp must be 1), gathered over TP."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_vp2o.model.inputs import causal_mask, position_ids

    model.eval()
    with torch.no_grad():
        ids_BS = ids_BS.to(device())
        out = model(ids_BS, position_ids(*ids_BS.shape, ids_BS.device), causal_mask(ids_BS.shape[1], ids_BS.device))
        out = gather_from_tensor_model_parallel_region(out)
    return out[..., :vocab].float()


def random_tokens(vocab: int, seed: int = 0, batch: int = 2, seq: int = 16) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)  # host: the same tokens on every device
    return torch.randint(0, vocab, (batch, seq), generator=gen, device="cpu")


def hf_logits(hf_dir, ids_BS: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids_BS).logits.float()


def load_fp32(ckpt, cfg: Config):
    """A fresh fp32 model on ``cfg``'s layout (pp forced to 1) with the checkpoint loaded."""
    from megatron_vp2o.checkpoint import load_model

    model_cfg = dataclasses.replace(cfg.model, params_dtype="fp32", expert_impl="sequential")
    world = _world()
    par = cfg.parallel
    cfg = world_config(model_cfg, par.tp, 1, par.ep, par.etp, world)
    start_world(cfg)
    model = build_model(cfg)
    load_model(ckpt, [model])
    return model, cfg


def verify_logits(ckpt, hf_dir, cfg: Config, seed: int = 0) -> float:
    """Collective: max |megatron - HF| fp32 logit difference on random tokens (the same on every rank)."""
    model, cfg = load_fp32(ckpt, cfg)
    ids = random_tokens(cfg.model.vocab_size, seed, seq=16 * cfg.parallel.tp)
    ours = megatron_logits(model, ids, cfg.model.vocab_size)
    del model
    diff = torch.zeros(1, dtype=torch.float64, device=device())  # broadcast: a device tensor (NCCL)
    if _rank() == 0:
        diff[0] = (ours.cpu() - hf_logits(hf_dir, ids)).abs().max().double()
        print(f"max logit diff {diff.item():.3e}", flush=True)
    if dist.is_initialized():
        dist.broadcast(diff, 0)
    return diff.item()


def export_hf(ckpt, out, max_shard_bytes: int = 4 << 30) -> dict:
    """Collective (any world; rank 0 writes): a dist checkpoint -> HF safetensors + config.json at ``out``."""
    from megatron_vp2o.checkpoint import latest_checkpoint
    from megatron_vp2o.checkpoint.meta import read_meta

    found = latest_checkpoint(ckpt)
    if found is None:
        raise archs.ConversionError(f"no complete checkpoint at '{ckpt}' (expected vp2o.json or a 'latest' marker)")
    meta = read_meta(found, "--ckpt")  # the saved config migrated to this version's keys
    hf_meta = meta.get("hf") or {}
    saved = build(Config, meta["config"]).model
    arch = archs.get_arch(hf_meta.get("arch") or ("qwen3_moe" if saved.qk_layernorm else "mixtral"))
    hf_config = archs.hf_config_from_model(arch, saved, hf_meta.get("config"))
    io.check_output_dir(out)
    model, cfg = _load_native(found, saved)
    owner = _rank() == 0
    if owner:
        with io.atomic_dir(out) as tmp:
            written = _write_hf(model, cfg, arch, tmp, max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
            _copy_tokenizer(hf_meta.get("source"), tmp)
    _barrier()
    return {"arch": arch.model_type, "tensors": len(written) if owner else None, "step": meta.get("step")}


def _load_native(found, saved):
    """Load in the checkpoint's own dtype (bf16 stays bf16: an exact export)."""
    from megatron_vp2o.checkpoint import load_model

    world = _world()
    cfg = world_config(dataclasses.replace(saved, expert_impl="sequential"), world=world)
    start_world(cfg)
    model = build_model(cfg)
    load_model(found, [model])
    return model, cfg


def _write_hf(model, cfg: Config, arch, tmp: Path, max_shard_bytes: int) -> dict:
    writer = io.ShardedWriter(tmp, max_shard_bytes)
    shapes = {}
    for hf_name, tensor in stream.hf_tensors([model], [shards_of(model, cfg)], arch, cfg.model.vocab_size):
        writer.add(hf_name, tensor)
        shapes[hf_name] = tuple(tensor.shape)
    mapping.check_hf_tensors(shapes, mapping.expected_hf_shapes(arch, cfg.model), "export")
    return writer.finish()


def _copy_tokenizer(source, tmp: Path) -> None:
    if not source or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, tmp / name)
