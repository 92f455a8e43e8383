"""reward_model: a learned reward, from any callable or a local Hugging Face sequence classifier.

`RewardModel` wraps either a callable `(prompt, response) -> float`, or a directory holding an
`AutoModelForSequenceClassification` checkpoint and its tokenizer (loaded with
local_files_only=True: never a download). The classifier scores the (prompt, response) pair,
encoded as a text pair, or through the tokenizer's chat template when it has one; the reward is
the logit of `label` (label 0 for the usual single-logit reward model). It is registered as a
*batched* reward so the model sees padded mini-batches, not one sample at a time:
`RewardModel(model_dir="...").register("reward_model")`.
"""

from collections.abc import Callable, Mapping, Sequence

from megatron_vp2o.rewards.registry import register


class RewardModel:
    """Scores (prompt, response) pairs with a callable or a local HF sequence classifier."""

    def __init__(self, scorer: Callable[[str, str], float] | None = None, *,
                 model_dir: str | None = None, label: int = 0, max_length: int = 1024,
                 batch_size: int = 8, device: str = "cpu"):
        if (scorer is None) == (model_dir is None):
            raise ValueError("RewardModel needs exactly one of `scorer` or `model_dir`")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, "
                             f"{max_length}")
        self.scorer, self.label, self.max_length = scorer, label, max_length
        self.batch_size, self.device = batch_size, device
        self.model = self.tokenizer = None
        if model_dir is not None:
            self._load(model_dir)

    def _load(self, model_dir: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True).to(self.device).eval()
        if not 0 <= self.label < self.model.config.num_labels:
            raise ValueError(f"label {self.label} out of range for a model with "
                             f"{self.model.config.num_labels} labels")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metas: Sequence[Mapping] | None = None) -> list[float]:
        """One score per (prompt, response); `metas` is accepted for the reward signature."""
        if self.scorer is not None:
            return [float(self.scorer(p, r)) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            scores += self._score_model(prompts[start:stop], responses[start:stop])
        return scores

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]):
        kwargs = dict(padding=True, truncation=True, max_length=self.max_length,
                      return_tensors="pt")
        if getattr(self.tokenizer, "chat_template", None):
            texts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                tokenize=False) for p, r in zip(prompts, responses)]
            return self.tokenizer(texts, **kwargs)
        return self.tokenizer(list(prompts), list(responses), **kwargs)

    def _score_model(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        batch = self._encode(prompts, responses).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits
        return logits[:, self.label].float().cpu().tolist()

    def register(self, name: str = "reward_model", overwrite: bool = False) -> "RewardModel":
        """Register this model as a batched reward under `name`."""
        register(name, self, batched=True, max_concurrency=1, overwrite=overwrite)
        return self
