"""RL prompt data: JSONL loading with line-precise errors, generators, and chat templates.

One JSON object per line: {"prompt": str, "task": str, ...} with, per task,
  math:          "answer" (the gold final answer, str or number)
  code:          "tests" (list of {"stdin", "expected_stdout"}, or assert-based test source)
  ifeval:        "meta": {"instruction_id_list": [...], "kwargs": [...]}
  reasoning_gym: "meta": {"dataset", "seed", "index"} (or "meta": {"entry": {...}})
  digit_sum:     "meta": {"target": int, "n_terms": int}
  digit_product: "meta": {"target": int, "n_digits": int}
and optional "id". `PromptRecord.reward_meta()` is what the task's reward function receives.
A malformed line raises ValueError naming the file, the line number and the field.

The shipped digit_sum prompts (the CPU main job's task, see rewards/digit_sum.py) are rebuilt,
byte for byte, by:
  python tools/make_prompts.py --digit-sum --n 256 --seed 0 \\
      --out data/prompts/digit_sum_train.jsonl
  python tools/make_prompts.py --digit-sum --n 64 --seed 1 \\
      --out data/prompts/digit_sum_eval.jsonl
"""

import dataclasses
import json
import random
from collections.abc import Iterable
from pathlib import Path

_FIELDS = {"prompt", "task", "answer", "tests", "meta", "id"}
_NEEDS = {"math": "answer", "code": "tests"}  # a top-level field the task cannot do without
_META_NEEDS = {  # meta keys each task needs, and their types
    "ifeval": {"instruction_id_list": list, "kwargs": list},
    "digit_sum": {"target": int, "n_terms": int},
    "digit_product": {"target": int, "n_digits": int},
}


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: its text, its task (a reward name) and what that reward needs."""

    prompt: str
    task: str
    answer: str | None = None  # gold final answer (math; informative for reasoning_gym)
    tests: list | str | None = None  # code tests
    meta: dict = dataclasses.field(default_factory=dict)  # task-specific fields
    id: str | None = None

    def reward_meta(self) -> dict:
        """The meta the task's reward function receives: meta plus answer and tests."""
        out = dict(self.meta)
        if self.answer is not None:
            out["answer"] = self.answer
        if self.tests is not None:
            out["tests"] = self.tests
        return out

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


def _type_name(value) -> str:
    return type(value).__name__


def _check_type(where: str, name: str, value, types: tuple) -> None:
    bad = isinstance(value, bool) and bool not in types  # bool is an int subclass
    if bad or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where}: field {name!r} must be {wanted}, got {_type_name(value)}")


def parse_prompt(obj, where: str, known_tasks: Iterable[str]) -> PromptRecord:
    """Validate one decoded JSON line; `where` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {sorted(_FIELDS)}")
    for name in ("prompt", "task"):
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        _check_type(where, name, obj[name], (str,))
    task, known = obj["task"], sorted(known_tasks)
    if task not in known:
        raise ValueError(f"{where}: field 'task': unknown task {task!r}; known: {known}")
    if task in _NEEDS and _NEEDS[task] not in obj:
        raise ValueError(f"{where}: missing field {_NEEDS[task]!r} (required for task {task!r})")
    answer = obj.get("answer")
    if answer is not None:
        _check_type(where, "answer", answer, (str, int, float))
        answer = str(answer)
    if obj.get("tests") is not None:
        _check_type(where, "tests", obj["tests"], (list, str))
    meta = obj.get("meta", {})
    _check_type(where, "meta", meta, (dict,))
    for key, typ in _META_NEEDS.get(task, {}).items():
        if key not in meta:
            raise ValueError(f"{where}: missing field 'meta.{key}' (required for task {task!r})")
        _check_type(where, f"meta.{key}", meta[key], (typ,))
    if task == "reasoning_gym" and "entry" not in meta:
        for key in ("dataset", "seed", "index"):
            if key not in meta:
                raise ValueError(f"{where}: missing field 'meta.{key}' (or 'meta.entry')")
    if obj.get("id") is not None:
        _check_type(where, "id", obj["id"], (str, int))
    record_id = None if obj.get("id") is None else str(obj["id"])
    return PromptRecord(obj["prompt"], task, answer, obj.get("tests"), meta, record_id)


def load_prompts(path: str | Path, known_tasks: Iterable[str] | None = None) -> list[PromptRecord]:
    """Read a prompt JSONL file (blank lines skipped). `known_tasks` defaults to the registered
    reward names."""
    if known_tasks is None:
        from megatron_vp2o import rewards

        known_tasks = rewards.available()
    known_tasks = list(known_tasks)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err}") from None
            records.append(parse_prompt(obj, where, known_tasks))
    return records


def load_prompt_file(path: str | Path, field: str) -> list[PromptRecord]:
    """The prompt records of ``path``, or a one-line ``ConfigError`` naming ``field`` (a missing or
    empty file, or a malformed line): what `vp2o train` checks before any work."""
    from megatron_vp2o.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{field}: file '{path}' does not exist")
    try:
        records = load_prompts(path)
    except ValueError as exc:
        raise ConfigError(f"{field}: {str(exc).splitlines()[0]}") from None
    if not records:
        raise ConfigError(f"{field}: '{path}' holds no prompts; add JSONL lines with 'prompt' and 'task'")
    return records

def write_prompts(records: Iterable[PromptRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records))
    return path


def make_digit_sum_prompts(n: int, seed: int, n_terms: int = 2) -> list[PromptRecord]:
    """`n` digit_sum prompts f"{target}=" with targets drawn uniformly from those with at least
    two correct answers (1 .. 9*n_terms-1; with one term every target has exactly one)."""
    if n < 0 or n_terms < 1:
        raise ValueError(f"need n >= 0 and n_terms >= 1, got n={n}, n_terms={n_terms}")
    rng = random.Random(seed)
    lo, hi = (1, 9 * n_terms - 1) if n_terms > 1 else (0, 9)
    targets = [rng.randint(lo, hi) for _ in range(n)]
    return [PromptRecord(f"{t}=", "digit_sum", meta={"target": t, "n_terms": n_terms})
            for t in targets]


def make_digit_product_prompts(n: int, seed: int, n_digits: int = 3,
                               min_answers: int = 3) -> list[PromptRecord]:
    """`n` digit_product prompts f"{target}*" with targets drawn uniformly from the digit products
    that have at least `min_answers` ordered n_digits-digit answers (rewards/digit_product.py)."""
    from megatron_vp2o.rewards.digit_product import solution_counts

    if n < 0 or n_digits < 1:
        raise ValueError(f"need n >= 0 and n_digits >= 1, got n={n}, n_digits={n_digits}")
    eligible = sorted(t for t, c in solution_counts(n_digits).items() if t > 0 and c >= min_answers)
    if not eligible:
        raise ValueError(f"no digit product of {n_digits} digits has >= {min_answers} answers")
    rng = random.Random(seed)
    return [PromptRecord(f"{t}*", "digit_product", meta={"target": t, "n_digits": n_digits})
            for t in (rng.choice(eligible) for _ in range(n))]


def reasoning_gym_prompts(name: str, n: int, seed: int, **config) -> list[PromptRecord]:
    """`n` prompts from reasoning-gym's generator `name` (deterministic in `seed`); each meta
    points back at its entry, so the reward regenerates it and uses the dataset's own scorer."""
    import reasoning_gym  # optional dependency: pip install reasoning-gym

    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    meta = {"dataset": name, "seed": seed, "size": n, **({"config": config} if config else {})}
    return [PromptRecord(entry["question"], "reasoning_gym",
                         None if entry.get("answer") is None else str(entry["answer"]),
                         meta={**meta, "index": i}) for i, entry in enumerate(dataset)]


def apply_chat_template(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as the model should see it: through the tokenizer's chat template (as a user
    turn, generation prompt added) when it has one, else the raw prompt. Accepts an HF tokenizer,
    our tokenizer wrappers (their `.hf`), or anything else (raw prompt)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    if not getattr(hf, "chat_template", None) or not hasattr(hf, "apply_chat_template"):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
