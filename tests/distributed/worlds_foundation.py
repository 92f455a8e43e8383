"""Functions that run inside multi-rank test worlds for tests/distributed/test_parity.py.

The parity protocol: a 1-rank world writes the initial weights as a dist checkpoint and takes one
reference step; each layout world loads those weights (resharded on load), takes the same step
on the same global batch and saves its weights; a final 1-rank world loads every result and
compares parameters and logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vp2o.config import Config, build

# adam_eps=1e-6 below: Adam's first step is lr * g / (|g| + eps), which turns fp32 reduction-order noise on
# near-zero gradients into O(lr) differences; a larger eps makes the comparison measure the gradients.
TINY_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, num_experts=8,
                  moe_router_topk=2, moe_ffn_hidden_size=32, ffn_hidden_size=64, vocab_size=64, seq_length=16,
                  router=dict(aux_loss_type="none"))
GLOBAL_BATCH, MICRO_BATCH = 8, 2


def tiny_config(parallel: dict | None = None, model: dict | None = None) -> Config:
    data = {"model": dict(TINY_MODEL, **(model or {})), "parallel": parallel or {},
            "train": dict(steps=1, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH, lr=1e-2,
                          adam_eps=1e-6, warmup_steps=0, min_lr=1e-2, seed=7)}
    return build(Config, data)


def global_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (GLOBAL_BATCH, TINY_MODEL["seq_length"] + 1), generator=torch.Generator().manual_seed(seed))


def my_micro_batches(ids_BS1: torch.Tensor):
    from megatron.core import parallel_state as ps

    from megatron_vp2o.data.sft import SFTBatch

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = ids_BS1.shape[0] // dp
    mine = ids_BS1[rank * per:(rank + 1) * per]
    return [SFTBatch(c[:, :-1], c[:, 1:], torch.ones(c.shape[0], c.shape[1] - 1)) for c in mine.split(MICRO_BATCH)]


def logits(trainable, ids_BS: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits of a plain forward (no pipeline: pp must be 1)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_vp2o.training.step import causal_mask, position_ids

    model = trainable.module
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        out = model(ids_BS.to(dev), position_ids(*ids_BS.shape).to(dev), causal_mask(ids_BS.shape[1]).to(dev))
        out = gather_from_tensor_model_parallel_region(out).cpu()
    model.train()
    return out


def _setup(cfg):
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.training.setup import build_trainable

    init_parallel(cfg)
    return build_trainable(cfg)


def reference(payload):
    """1 rank: initial checkpoint, the reference step (twice: bitwise determinism), its checkpoint."""
    from megatron_vp2o.checkpoint import load_model, save_checkpoint
    from megatron_vp2o.training.step import train_step

    cfg = tiny_config()
    tr = _setup(cfg)
    save_checkpoint(payload["init"], 0, tr, {"kind": "test"}, with_optimizer=False)
    ids = global_batch()
    m1 = train_step(tr, my_micro_batches(ids))
    params1 = {k: v.detach().clone() for k, v in tr.module.state_dict().items() if torch.is_tensor(v)}
    save_checkpoint(payload["ref"], 1, tr, {"kind": "test"}, with_optimizer=False)
    from megatron_vp2o.training.setup import build_trainable

    tr2 = build_trainable(cfg)
    load_model(payload["init"], tr2.models)
    tr2.optimizer.reload_model_params()
    m2 = train_step(tr2, my_micro_batches(ids))
    params2 = {k: v.detach() for k, v in tr2.module.state_dict().items() if torch.is_tensor(v)}
    bitwise = all(torch.equal(params1[k], params2[k]) for k in params1) and m1["loss"] == m2["loss"]
    changed = any(not torch.equal(params1[k], v) for k, v in _initial(payload["init"]).items() if k in params1)
    return {"loss": m1["loss"], "grad_norm": m1["grad_norm"], "bitwise_repeat": bitwise, "changed": changed}


def _initial(path):
    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.training.setup import build_trainable

    tr = build_trainable(tiny_config())
    load_model(path, tr.models)
    return {k: v.detach().clone() for k, v in tr.module.state_dict().items() if torch.is_tensor(v)}


def layout_step(payload):
    """N ranks: load the initial weights under ``payload['parallel']``, one step, save; logits if pp == 1."""
    from megatron_vp2o.checkpoint import load_model, save_checkpoint
    from megatron_vp2o.training.step import train_step

    cfg = tiny_config(payload["parallel"], payload.get("model"))
    tr = _setup(cfg)
    load_model(payload["init"], tr.models)
    tr.optimizer.reload_model_params()
    metrics = train_step(tr, my_micro_batches(global_batch()))
    save_checkpoint(payload["out"], 1, tr, {"kind": "test"}, with_optimizer=False)
    result = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "world": dist.get_world_size()}
    if cfg.parallel.pp == 1:
        result["logits"] = logits(tr, global_batch(1)[:, :-1])
    return result


def compare(payload):
    """1 rank: load the reference and every layout's result; max |param diff| and logit diffs."""
    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.training.setup import build_trainable

    cfg = tiny_config()
    _setup(cfg)
    ref = build_trainable(cfg)
    load_model(payload["ref"], ref.models)
    ref_params = dict(ref.module.state_dict())
    probe = global_batch(1)[:, :-1]
    out = {}
    for name, path in payload["layouts"].items():
        other = build_trainable(cfg)
        load_model(path, other.models)
        diffs = {k: (ref_params[k] - v).abs().max().item() for k, v in other.module.state_dict().items()
                 if torch.is_tensor(v) and v.is_floating_point()}
        worst = max(diffs, key=diffs.get)
        out[name] = {"max_param_diff": diffs[worst], "worst_param": worst, "n_params": len(diffs),
                     "logits_ep1": logits(other, probe)}
    return out
