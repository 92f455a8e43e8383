"""A tiny local Hugging Face tokenizer built offline (fixtures in tests/conftest.py)."""

import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_char_tokenizer(chat_template: str | None = None):
    """A character-level `PreTrainedTokenizerFast` (no download), optionally with a chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz0123456789=+ "
    vocab = {c: i for i, c in enumerate(["[PAD]", "[UNK]", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                              pad_token="[PAD]")
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
