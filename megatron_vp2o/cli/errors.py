"""The catalogue of user-facing errors: the error classes (what each means, the fix) and example
messages produced by running real command lines through the CLI's checks.

``docs/errors.md`` is generated from this module -- ``python -m megatron_vp2o.cli.errors --write``
-- and ``tests/cli/test_errors_doc.py`` fails when the file and the code disagree (a message
changed, a class added without a row here).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
TINY = "examples/configs/tiny_cpu.yaml"

# (class, where it is defined, what it means, the fix)
CLASSES = (
    ("usage error", "megatron_vp2o.cli.main.OneLineParser",
     "the command line itself is wrong: an unknown subcommand or option, a missing required option, "
     "an option value of the wrong type or outside its choices",
     "run `vp2o <command> --help` and correct the option"),
    ("ConfigError", "megatron_vp2o.config.loader",
     "a config field or an input is unusable: unknown key, wrong type, out-of-range or non-finite "
     "number, malformed YAML, impossible parallel layout for WORLD_SIZE, a missing/empty/unreadable "
     "input file, a checkpoint that is missing, damaged, of another model or of a newer megatron-vp2o version "
     "(older versions' saved configs are migrated: megatron_vp2o/config/migrate.py), code rewards where the "
     "bubblewrap sandbox cannot run",
     "change the named field or path as the message says; the message names it as `section.field`"),
    ("ConversionError", "megatron_vp2o.checkpoint.hf.archs",
     "`vp2o convert` input is unusable: the HF directory, its config.json (not JSON, a required key missing, "
     "a value of the wrong type or out of range: the key is named) or safetensors, the "
     "layout flags, or an output directory that already has content (a ConfigError)",
     "fix the named directory or flag; nothing was written"),
    ("CheckpointStateError", "megatron_vp2o.checkpoint.state",
     "a per-rank resume file (`rank<r>.pt`) is not plain data (tensors and plain containers): an "
     "old-format or foreign pickle; it was refused without being unpickled (a ConfigError)",
     "resume from a checkpoint written by this version, or start without --resume"),
    ("UnsafeCheckpointError", "megatron_vp2o.checkpoint.safety",
     "a dist checkpoint holds a pickle that could run code when megatron loads it (its .metadata "
     "names a global outside torch's checkpoint dataclasses, or a bytes entry / common.pt is not "
     "weights-only data); it was refused before megatron read it (a ConfigError)",
     "use a checkpoint written by vp2o, from a source you trust"),
    ("DataError", "megatron_vp2o.eval.tasks",
     "a `vp2o eval` benchmark or responses file is missing, not UTF-8, not valid JSON/CSV, or lacks "
     "a field its task needs (a ConfigError)",
     "fix the named file and line, or pass the matching --task"),
)

# (what goes wrong, environment, argument list): each runs through the parser and the pre-flight
# checks only (never the run itself) from the repository root.
EXAMPLES = (
    ("unknown key", {}, ["train", "--config", TINY, "--out", "runs/x", "logging.tensorbord=true"]),
    ("wrong type", {}, ["train", "--config", TINY, "--out", "runs/x", "train.steps=abc"]),
    ("out of range", {}, ["train", "--config", TINY, "--out", "runs/x", "rl.sampling.top_p=1.5"]),
    ("non-finite number", {}, ["train", "--config", TINY, "--out", "runs/x", "train.lr=.inf"]),
    ("malformed YAML value", {}, ["train", "--config", TINY, "--out", "runs/x", "rl.lr=[1"]),
    ("override below a value", {}, ["train", "--config", TINY, "--out", "runs/x", "train.lr.x=1"]),
    ("missing config file", {}, ["train", "--config", "nope.yaml", "--out", "runs/x"]),
    ("impossible layout", {"WORLD_SIZE": "2"}, ["train", "--config", TINY, "--out", "runs/x", "parallel.ep=3"]),
    ("prompts vs data-parallel size", {"WORLD_SIZE": "2"},
     ["train", "--config", TINY, "--out", "runs/x", "rl.prompts_per_step=3"]),
    ("missing input file", {}, ["train", "--config", TINY, "--out", "runs/x", "rl.prompts=data/prompts/nope.jsonl"]),
    ("missing checkpoint", {}, ["train", "--config", TINY, "--out", "runs/x", "rl.policy=checkpoints/nope"]),
    ("checkpoint of a newer version", {},
     ["train", "--config", TINY, "--out", "runs/x", "rl.policy=tests/checkpoint/fixtures/v9.0.0-future"]),
    ("resume of an RL checkpoint from before the loop state", {},
     ["train", "--config", TINY, "--out", "runs/x", "--resume",
      "checkpoint.dir=tests/checkpoint/fixtures/v0.1.0-rl-pre_loop_state"]),
    ("resume of another command's checkpoint (an RL run's under `vp2o sft`, an SFT run's under `vp2o train`)", {},
     ["sft", "--config", TINY, "--out", "runs/x", "--resume",
      "checkpoint.dir=tests/checkpoint/fixtures/v0.1.0-rl-pre_loop_state"]),
    ("code rewards without a sandbox", {"VP2O_SANDBOX_NO_BWRAP": "1", "VP2O_SANDBOX_UNCONFINED": "0"},
     ["train", "--config", TINY, "--out", "runs/x", "rl.eval=[{task: code, data: data/eval/code_sample.jsonl}]"]),
    ("checkpoint of another model", {}, ["train", "--config", TINY, "--out", "runs/x", "model.num_experts=16"]),
    ("vLLM engine wider than the world (docs/vllm.md)", {"WORLD_SIZE": "2"},
     ["train", "--config", TINY, "--out", "runs/x", "rl.engine=vllm", "rl.vllm.tp=4"]),
    ("vLLM engine where vLLM is not installed (also `vp2o eval --engine vllm`)", {},
     ["train", "--config", TINY, "--out", "runs/x", "rl.engine=vllm"]),
    ("truncated importance weight cap below 1", {},
     ["train", "--config", TINY, "--out", "runs/x", "rl.engine=vllm", "rl.engine_is_cap=0.5"]),
    ("missing SFT data", {}, ["sft", "--config", TINY, "--out", "runs/x", "data.path=data/sft/nope.jsonl"]),
    ("bad WORLD_SIZE", {"WORLD_SIZE": "two"}, ["sft", "--config", TINY, "--out", "runs/x"]),
    ("conversion input", {}, ["convert", "hf-to-mcore", "--hf", "hf/nope", "--out", "runs/x"]),
    ("conversion layout", {}, ["convert", "hf-to-mcore", "--hf", "hf/nope", "--out", "runs/x", "--tp", "0"]),
    ("export input", {}, ["convert", "mcore-to-hf", "--ckpt", "checkpoints/nope", "--out", "runs/x"]),
    ("unknown option", {}, ["train", "--config", TINY, "--out", "runs/x", "--bogus"]),
    ("option of the wrong type", {}, ["convert", "hf-to-mcore", "--hf", "h", "--out", "o", "--tp", "two"]),
)
# examples that run as if these modules were not installed (their message must not depend on the machine)
HIDDEN = {"vLLM engine where vLLM is not installed (also `vp2o eval --engine vllm`)": ("vllm",)}


@contextlib.contextmanager
def _hidden(modules):
    """``importlib.util.find_spec`` returns None for each of ``modules`` (``sys.modules[name] = None``)."""
    saved = {m: sys.modules[m] for m in modules if m in sys.modules}
    sys.modules.update({m: None for m in modules})
    try:
        yield
    finally:
        for m in modules:
            sys.modules.pop(m, None)
        sys.modules.update(saved)


@contextlib.contextmanager
def _environ(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def example_message(argv: list[str], env: dict | None = None, hidden=()) -> str:
    """The stderr line ``vp2o ARGV`` prints, from the parser and pre-flight checks only (``hidden``:
    modules that look uninstalled meanwhile)."""
    from megatron_vp2o.cli.main import parse_args, subcommand_modules, validate_args, one_line
    from megatron_vp2o.config import ConfigError

    err = io.StringIO()
    with contextlib.redirect_stderr(err), _environ(env or {}), _hidden(hidden):
        try:
            args = parse_args(argv)
        except SystemExit:
            return err.getvalue().strip()
        try:
            validate_args(args, subcommand_modules())
        except ConfigError as exc:
            return f"vp2o {args.command}: error: {one_line(exc)}"
    raise RuntimeError(f"example {argv} passes validation; it documents no error")


def render() -> str:
    lines = ["# Errors", "",
             "Generated by `python -m megatron_vp2o.cli.errors --write` from `megatron_vp2o/cli/errors.py`;",
             "`tests/cli/test_errors_doc.py` fails when this file and the code disagree.", "",
             "Every bad input ends the same way: **one line on stderr** that names the field (`section.field`),",
             "option or path and the fix, **exit code 2**, and nothing started or written: the checks run before",
             "megatron-core is imported, before any process group, model or output file exists. Other failures",
             "(a crash inside a run) exit 1 with a traceback.", "",
             "## Error classes", "", "| error | defined in | meaning | fix |", "|---|---|---|---|"]
    lines += [f"| `{name}` | `{where}` | {meaning} | {fix} |" for name, where, meaning, fix in CLASSES]
    lines += ["", "## Examples", "",
              "Run from the repository root; `WORLD_SIZE` is what `torchrun` sets.", ""]
    for title, env, argv in EXAMPLES:
        prefix = "".join(f"{k}={v} " for k, v in env.items())
        lines += [f"**{title}**: `{prefix}vp2o {' '.join(argv)}`", "", "```",
                  example_message(argv, env, HIDDEN.get(title, ())), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--write" in argv:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    os.chdir(DOC.parents[1])
    sys.exit(main())
