"""Tokenizers: a built-in character tokenizer for the tiny recipes, or a local HF tokenizer.

Nothing is downloaded: ``builtin:char`` is defined here, and an HF tokenizer is loaded from a
local directory with ``local_files_only=True``.

``builtin:char`` ids: 0 <pad>, 1 <bos>, 2 <eos>, then printable ASCII 32..126 at ``ord(c) - 29``
(so 3..97); vocabulary 128 (ids 98..127 unused, room for vocab padding).
"""

from __future__ import annotations

from pathlib import Path

from megatron_vp2o.config import ConfigError


class CharTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 128
    chat_template = None

    def encode(self, text: str) -> list[int]:
        bad = [c for c in text if not 32 <= ord(c) <= 126]
        if bad:
            raise ValueError(f"builtin:char tokenizer only encodes printable ASCII; got {bad[0]!r} in {text!r}")
        return [ord(c) - 29 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i + 29) for i in ids if 3 <= int(i) <= 97)

    def encode_prompt(self, text: str) -> list[int]:
        """A sequence start: ``<bos>`` + text (SFT examples and RL prompts both begin this way)."""
        return [self.bos_id] + self.encode(text)


class HFTokenizer:
    """Wraps a local ``transformers`` tokenizer with the same small interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.eos_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)
        self.chat_template = getattr(self.hf, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """A sequence start with the tokenizer's own special tokens (BOS where it uses one)."""
        return self.hf.encode(text, add_special_tokens=True)


def load_tokenizer(spec: str):
    """``builtin:char`` or a local directory holding a Hugging Face tokenizer."""
    if spec == "builtin:char":
        return CharTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"data.tokenizer: '{spec}' is neither 'builtin:char' nor an existing directory with a "
                          "Hugging Face tokenizer (tokenizer.json / tokenizer_config.json); nothing is downloaded")
    return HFTokenizer(str(path))
