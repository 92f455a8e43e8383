"""Contract (property, hypothesis): `vp2o train / sft / eval / convert` with a valid argument list in
which ONE field is mutated -- wrong type, out of range, non-finite, unknown key, malformed YAML value,
missing or unreadable path, empty file, wrong model checkpoint -- exits 2 with one stderr line naming
the field or path, no traceback, before the platform layer (so before megatron, any process group or
model), and leaves the output directory absent or unchanged.

Overrides are drawn from the real schema (every leaf field of ``Config``, the registered rl section
included). Runs in-process through ``megatron_vp2o.cli.main.main``; the count of cases is printed.
"""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cli.conftest import TINY, PlatformReached, fake_checkpoint, run_cli, saved_config
from megatron_vp2o.checkpoint.meta import SHAPE_FIELDS
from megatron_vp2o.config import Config

EXAMPLES = 400
EVAL_DATA = "data/eval/math_digit_sum.jsonl"
HF_CONFIG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 32,
             "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 64,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "torch_dtype": "float32"}


def schema_leaves(cls=Config, prefix=""):
    """(dotted path, annotation) of every leaf field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from schema_leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _kinds(tp) -> set:
    """The scalar kinds an annotation accepts: int, float, bool, str, literal, list, dict."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return set().union(*(_kinds(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return {"literal"}
    if origin in (list, tuple):
        return {"list"}
    if origin is dict:
        return {"dict"}
    return {getattr(tp, "__name__", str(tp))}


LEAVES = [(path, _kinds(tp)) for path, tp in schema_leaves()]
NUMERIC = [p for p, k in LEAVES if k & {"int", "float"}]
FLOATS = [p for p, k in LEAVES if "float" in k]
# values of the wrong type for each kind (a string where a number goes, a number where text goes, ...)
WRONG = {"int": ["abc", "1.5", "[1]", "{a: 1}", "true"], "float": ["abc", "[1]", "{a: 1}", "true"],
         "bool": ["maybe", "3", "[true]", "1.5"], "str": ["[1, 2]", "{a: 1}", "3"],
         "literal": ["bogus_choice", "3", "[1]"], "list": ["3", "abc", "{a: 1}", "[abc]"], "dict": ["3", "[1]"]}
MALFORMED = ["[1", "{a", "'open", "a: b: c", "[1, {2]"]


def _wrong_values(kinds: set) -> list:
    accepted = set()  # a value another accepted kind would take is not "wrong" (int -> float, str -> literal)
    if "float" in kinds:
        accepted |= {"1.5"}
    if "str" in kinds:
        accepted |= {"abc", "maybe", "bogus_choice"}
    return [v for k in kinds for v in WRONG.get(k, []) if v not in accepted]


@st.composite
def override_mutation(draw):
    """(override, words: one of them must be in the error line)."""
    kind = draw(st.sampled_from(["wrong_type", "out_of_range", "non_finite", "unknown_key", "malformed_yaml"]))
    if kind == "wrong_type":
        path, kinds = draw(st.sampled_from([(p, k) for p, k in LEAVES if _wrong_values(k)]))
        return f"{path}={draw(st.sampled_from(_wrong_values(kinds)))}", [path]
    if kind == "out_of_range":
        path = draw(st.sampled_from(NUMERIC))
        return f"{path}={draw(st.sampled_from(['-1', '-1000000', '-0.5']))}", [path]
    if kind == "non_finite":
        path = draw(st.sampled_from(FLOATS))
        return f"{path}={draw(st.sampled_from(['.inf', '-.inf', '.nan', '1e999']))}", [path]
    if kind == "unknown_key":
        section = draw(st.sampled_from(sorted({p.rpartition('.')[0] for p, _ in LEAVES if "." in p}) + ["bogus"]))
        key = draw(st.sampled_from(["bogus", "hiden_size", "lr_", "x"]))
        return f"{section}.{key}=1", [f"{section}.{key}" if section != "bogus" else "'bogus'"]
    path = draw(st.sampled_from([p for p, _ in LEAVES]))
    return f"{path}={draw(st.sampled_from(MALFORMED))}", [path]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs (module-scoped, read-only for the cases) and a valid HF directory for hf-to-mcore."""
    root = tmp_path_factory.mktemp("fuzz")
    f = {"missing": root / "missing.jsonl", "dir": root / "a_dir", "empty": root / "empty.txt",
         "binary": root / "binary.bin", "badjson": root / "bad.jsonl", "yaml_list": root / "list.yaml",
         "badyaml": root / "bad.yaml"}
    f["dir"].mkdir()
    f["empty"].write_text("")
    f["binary"].write_bytes(b"\xff\xfe\x00\x81" * 64)  # not UTF-8: unreadable as text (the tests run as root,
    f["badjson"].write_text('{"prompt": "1=", \n')  # so file permissions cannot make a file unreadable)
    f["yaml_list"].write_text("- 1\n- 2\n")
    f["badyaml"].write_text("model: [1\n")
    ckpts = root / "ckpts"
    f["wrong_model"] = {}
    for name in SHAPE_FIELDS:
        value = saved_config()["config"]["model"][name]
        other = (not value) if isinstance(value, bool) else (value * 2 if value else 16)
        f["wrong_model"][name] = fake_checkpoint(ckpts / f"wrong_{name}", {name: other}).parent
    corrupt = fake_checkpoint(ckpts / "corrupt")
    (corrupt / "vp2o.json").write_text("{not json")
    f["corrupt_ckpt"] = corrupt.parent
    no_config = fake_checkpoint(ckpts / "no_config")
    (no_config / "vp2o.json").write_text(json.dumps({"kind": "sft", "step": 1}))
    f["no_config_ckpt"] = no_config.parent
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    from megatron_vp2o.checkpoint.hf import archs, mapping

    arch, model = archs.model_config_from_hf(HF_CONFIG)
    save_file({k: torch.zeros(s) for k, s in mapping.expected_hf_shapes(arch, model).items()},
              str(hf / "model.safetensors"))
    f["hf"] = hf
    for name, text in (("hf_noconfig", None), ("hf_emptyconfig", ""), ("hf_badconfig", "{oops")):
        d = root / name
        d.mkdir()
        if text is not None:
            (d / "config.json").write_text(text)
        f[name] = d
    f["nonempty_out"] = root / "nonempty_out"
    f["nonempty_out"].mkdir()
    (f["nonempty_out"] / "keep.txt").write_text("mine")
    return f


def _path_values(files, kind):
    """(value, description) of bad paths for a file-valued or a checkpoint-valued field."""
    common = [files["missing"], files["dir"] if kind == "file" else files["empty"], files["empty"], files["binary"]]
    if kind == "file":
        return common + [files["badjson"]]
    return common + [files["dir"], files["corrupt_ckpt"]]


@st.composite
def case(draw, files, out_root):
    """(argv, words, out): a valid argument list of one command with one field mutated."""
    n = draw(st.integers(0, 10**9))
    out = out_root / f"out{n}"
    command = draw(st.sampled_from(["train", "sft", "eval", "convert-import", "convert-export"]))
    if command in ("train", "sft", "eval"):
        base = {"train": ["train", "--config", TINY, "--out", out],
                "sft": ["sft", "--config", TINY, "--out", out],
                "eval": ["eval", "--ckpt", "checkpoints/tiny_policy", "--task", "math", "--data", EVAL_DATA,
                         "--out", out, "--config", TINY]}[command]
        where = draw(st.sampled_from(["override", "override", "override", "path", "wrong_model", "config_file"]))
        if where == "override":
            override, words = draw(override_mutation())
            return base + [override], words, out
        if where == "config_file":
            bad = draw(st.sampled_from([files[k] for k in ("missing", "dir", "empty", "binary", "yaml_list",
                                                           "badyaml")]))
            argv = list(base)
            argv[argv.index("--config") + 1] = bad
            return argv, [str(bad)], out
        field = {"train": "rl.policy", "sft": "checkpoint.load", "eval": None}[command]
        if where == "wrong_model":
            name = draw(st.sampled_from(SHAPE_FIELDS))
            bad = files["wrong_model"][name]
            if command == "eval":
                argv = list(base)
                argv[argv.index("--ckpt") + 1] = bad
                return argv, [str(bad)], out
            return base + [f"{field}={bad}"], [field, str(bad)], out
        choices = {"train": [("rl.prompts", "file"), ("rl.eval_prompts", "file"), ("rl.policy", "ckpt"),
                             ("data.tokenizer", "tok")],
                   "sft": [("data.path", "file"), ("checkpoint.load", "ckpt"), ("data.tokenizer", "tok")],
                   "eval": [("--data", "file"), ("--ckpt", "ckpt")]}[command]
        target, kind = draw(st.sampled_from(choices))
        values = ([files[k] for k in ("missing", "empty", "binary", "dir")] if kind == "tok"
                  else _path_values(files, kind))
        bad = draw(st.sampled_from(values))
        if target.startswith("--"):
            argv = list(base)
            argv[argv.index(target) + 1] = bad
            return argv, [str(bad)], out
        return base + [f"{target}={bad}"], [target, str(bad)], out
    if command == "convert-import":
        base = ["convert", "hf-to-mcore", "--hf", files["hf"], "--out", out]
        flag = draw(st.sampled_from(["--hf", "--tp", "--pp", "--ep", "--etp", "--tol", "--dtype", "--out"]))
        if flag == "--hf":
            bad = draw(st.sampled_from([files[k] for k in ("missing", "empty", "dir", "hf_noconfig",
                                                           "hf_emptyconfig", "hf_badconfig")]))
            return ["convert", "hf-to-mcore", "--hf", bad, "--out", out], [str(bad)], out
        if flag == "--out":
            return ["convert", "hf-to-mcore", "--hf", files["hf"], "--out", files["nonempty_out"]], \
                [str(files["nonempty_out"])], files["nonempty_out"]
        values = {"--tol": ["nan", "inf", "-1", "abc"], "--dtype": ["fp8", "1"]}.get(flag, ["0", "-1", "abc", "1.5"])
        return base + [flag, draw(st.sampled_from(values))], [flag], out
    base = ["convert", "mcore-to-hf", "--ckpt", "checkpoints/tiny_policy", "--out", out]
    flag = draw(st.sampled_from(["--ckpt", "--max-shard-gb", "--out"]))
    if flag == "--ckpt":
        bad = draw(st.sampled_from(_path_values(files, "ckpt") + [files["no_config_ckpt"]]))
        return ["convert", "mcore-to-hf", "--ckpt", bad, "--out", out], [str(bad)], out
    if flag == "--out":
        return base[:-1] + [files["nonempty_out"]], [str(files["nonempty_out"])], files["nonempty_out"]
    return base + [flag, draw(st.sampled_from(["0", "-1", "nan", "inf", "abc"]))], [flag], out


def _snapshot(path: Path):
    return None if not path.exists() else sorted((str(p), p.read_bytes() if p.is_file() else b"")
                                                 for p in path.rglob("*"))


@pytest.mark.parametrize("argv", [
    ["train", "--config", TINY, "--out", "{out}"], ["sft", "--config", TINY, "--out", "{out}"],
    ["eval", "--ckpt", "checkpoints/tiny_policy", "--task", "math", "--data", EVAL_DATA, "--out", "{out}",
     "--config", TINY],
    ["convert", "hf-to-mcore", "--hf", "{hf}", "--out", "{out}"],
    ["convert", "mcore-to-hf", "--ckpt", "checkpoints/tiny_policy", "--out", "{out}"]], ids=lambda a: a[0] + a[1])
def test_base_argument_lists_pass_validation(argv, files, tmp_path, capsys, no_platform):
    """Without a mutation each base list passes every check and reaches the platform layer."""
    argv = [str(a).format(out=tmp_path / "out", hf=files["hf"]) for a in argv]
    with pytest.raises(PlatformReached):
        run_cli(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_one_mutated_field_gives_one_line_and_exit_2(files, tmp_path, capsys, no_platform):
    tried = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case(files, tmp_path))
    def check(c):
        argv, words, out = c
        before = _snapshot(out)
        rc, lines = run_cli(argv, capsys)
        shown = " ".join(map(str, argv))
        assert rc == 2, (shown, lines)
        assert len(lines) == 1 and "Traceback" not in lines[0], (shown, lines)
        assert any(w in lines[0] for w in words), (shown, words, lines[0])
        assert _snapshot(out) == before, shown
        assert not dist.is_initialized()
        key = argv[0] if argv[0] != "convert" else f"convert {argv[1]}"
        tried[key] = tried.get(key, 0) + 1

    check()
    total = sum(tried.values())
    with capsys.disabled():
        print(f"\n[fuzz] {total} mutated argument lists, 0 failures: "
              + ", ".join(f"{k} {v}" for k, v in sorted(tried.items())))
    assert total >= EXAMPLES * 0.9 and len(tried) == 5, tried
