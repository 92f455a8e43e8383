"""ifeval: IFEval-style verifiable instructions (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models"), with Google's instruction ids and kwargs semantics.

Our own checkers, because lm-eval's need nltk's punkt_tab, which cannot be downloaded here. Each
checker reproduces Google's `check_following` for the same id and kwargs; where we depart:
  * sentences are split by a regex (sentence-ending punctuation, then whitespace; a few common
    abbreviations protected) instead of nltk's punkt;
  * capital-word counting tokenizes with a regex (hyphenated words are one word, as in nltk);
  * change_case:english_* check the case only: no language detection (langdetect is not here);
  * a missing kwarg is an error (Google draws a random one: right for generating instructions,
    wrong for grading); None-valued kwargs, as in the HF dataset's rows, are dropped first;
  * language:response_language is not supported (an unknown id is an error listing the ids).
meta: {"instruction_id_list": [...], "kwargs": [{...}, ...]}, optional "mode": "strict"
(default: the response as is) or "loose" (also lm-eval's variants without the first/last line and
without asterisks), optional "score": "all" (default: 1.0 iff every instruction is followed) or
"fraction" (the fraction followed).
"""

import collections
import json
import re
from collections.abc import Callable, Mapping

from megatron_vp2o.rewards.registry import register

_RELATIONS = ("less than", "at least")
_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|a\.m|p\.m|U\.S|Inc|Ltd|No)\.",
                     re.I)
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def _compare(count: int, threshold: int, relation: str) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")
    return count < threshold if relation == "less than" else count >= threshold


def split_sentences(text: str) -> list[str]:
    """Regex sentence split (our stand-in for nltk punkt): ., ! or ? then whitespace, or a blank
    line; the period of a common abbreviation does not end a sentence."""
    protected = _ABBREV.sub(lambda m: m.group(0).replace(".", "\0"), text)
    return [s.replace("\0", ".").strip() for s in _SENT_END.split(protected) if s.strip()]


def count_words(text: str) -> int:
    """Google's count_words: nltk RegexpTokenizer(r"\\w+") tokens."""
    return len(re.findall(r"\w+", text))


def _paragraphs_by_divider(value: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", value)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def _nth_paragraph_first_word(value: str, num_paragraphs: int, nth_paragraph: int,
                              first_word: str) -> bool:
    parts = re.split(r"\n\n", value)
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        found += ch.lower()
    return count == num_paragraphs and found == first_word.lower()


def _highlights(value: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value)
              if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def _postscript(value: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def _json(value: str) -> bool:
    value = value.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    try:
        json.loads(value.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def _two_responses(value: str) -> bool:
    parts, valid = value.split("******"), []
    for i, part in enumerate(parts):
        if part.strip():
            valid.append(part)
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _sections(value: str, section_spliter: str, num_sections: int) -> bool:
    pattern = r"\s?" + section_spliter.strip() + r"\s?\d+\s?"
    return len(re.split(pattern, value)) - 1 >= num_sections


def _capital_words(value: str, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"\w+(?:-\w+)*", value)
    return _compare(sum(w.isupper() for w in words), capital_frequency, capital_relation)


CHECKERS: dict[str, Callable[..., bool]] = {
    "keywords:existence": lambda v, keywords: all(
        re.search(k, v, flags=re.IGNORECASE) for k in keywords),
    "keywords:frequency": lambda v, keyword, frequency, relation: _compare(
        len(re.findall(keyword.strip(), v, flags=re.IGNORECASE)), frequency, relation),
    "keywords:forbidden_words": lambda v, forbidden_words: not any(
        re.search(r"\b" + w + r"\b", v, flags=re.IGNORECASE) for w in forbidden_words),
    "keywords:letter_frequency": lambda v, letter, let_frequency, let_relation: _compare(
        collections.Counter(v.lower())[letter.strip().lower()], let_frequency, let_relation),
    "length_constraints:number_sentences": lambda v, num_sentences, relation: _compare(
        len(split_sentences(v)), num_sentences, relation),
    "length_constraints:number_paragraphs": _paragraphs_by_divider,
    "length_constraints:number_words": lambda v, num_words, relation: _compare(
        count_words(v), num_words, relation),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": lambda v, num_placeholders: len(
        re.findall(r"\[.*?\]", v)) >= num_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda v, num_bullets: len(
        re.findall(r"^\s*\*[^\*].*$", v, flags=re.MULTILINE)) + len(
        re.findall(r"^\s*-.*$", v, flags=re.MULTILINE)) == num_bullets,
    "detectable_format:constrained_response": lambda v: any(c in v.strip() for c in _CONSTRAINED),
    "detectable_format:number_highlighted_sections": lambda v, num_highlights: _highlights(
        v) >= num_highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda v: any(
        t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", v)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda v, prompt_to_repeat: v.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda v, end_phrase: v.strip().strip('"').lower().endswith(
        end_phrase.strip().lower()),
    "startend:quotation": lambda v: len(v.strip()) > 1 and v.strip()[0] == v.strip()[-1] == '"',
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": lambda v: v.isupper(),
    "change_case:english_lowercase": lambda v: v.islower(),
    "punctuation:no_comma": lambda v: "," not in v,
}


def _variants(response: str, loose: bool) -> list[str]:
    """The response (strict) or lm-eval's loose variants of it."""
    if not loose:
        return [response]
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
            "\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


def check_instructions(response: str, instruction_ids: list[str], kwargs: list[Mapping],
                       loose: bool = False) -> list[bool]:
    """Whether `response` follows each instruction (Google's semantics, see module docstring)."""
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    followed = []
    for inst_id, inst_kwargs in zip(instruction_ids, kwargs):
        if inst_id not in CHECKERS:
            raise ValueError(f"unknown IFEval instruction {inst_id!r}; supported: {sorted(CHECKERS)}")
        args = {k: v for k, v in (inst_kwargs or {}).items() if v is not None}
        check = CHECKERS[inst_id]
        followed.append(any(v.strip() and check(v, **args) for v in _variants(response, loose)))
    return followed


def ifeval_reward(prompt: str, response: str, meta: Mapping) -> float:
    """1.0 iff every instruction is followed ("all"), or the fraction followed ("fraction")."""
    followed = check_instructions(response, list(meta["instruction_id_list"]),
                                  list(meta["kwargs"]), loose=meta.get("mode") == "loose")
    if meta.get("score", "all") == "fraction":
        return sum(followed) / max(1, len(followed))
    return float(all(followed))


register("ifeval", ifeval_reward)
