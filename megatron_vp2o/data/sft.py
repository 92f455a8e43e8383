"""SFT data: JSONL of ``{"prompt", "response"}`` (loss on the response) or ``{"text"}`` (loss on all).

Each example becomes ``<bos> prompt response <eos>`` padded/truncated to ``seq_length + 1`` ids;
``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask`` marks the response (and ``<eos>``).
Batches are deterministic functions of ``(seed, step)``: the order is a seeded permutation per
epoch, so a resumed run sees exactly the batches it would have seen (the data position is the step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vp2o.config import ConfigError


@dataclass
class SFTBatch:
    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] float32


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path: file '{path}' does not exist; point data.path at a JSONL file "
                          "(make one with `vp2o make-data digit-sum`)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not ("text" in row or ("prompt" in row and "response" in row)):
            raise ConfigError(f"{path}:{lineno}: each line needs a 'text' field or 'prompt' and 'response' fields")
        for key in ("text", "prompt", "response"):
            if key in row and not isinstance(row[key], str):
                raise ConfigError(f"{path}:{lineno}: field '{key}' must be a string")
        rows.append(row)
    if not rows:
        raise ConfigError(f"data.path: '{path}' holds no examples")
    return rows


def encode_example(tok, row: dict, seq_length: int, loss_on_prompt: bool) -> tuple[list[int], list[float]]:
    prompt = tok.encode_prompt(row.get("prompt", ""))
    response = tok.encode(row["response"] if "response" in row else row["text"]) + [tok.eos_id]
    ids = prompt + response
    target_mask = [0.0] * len(prompt) + [1.0] * len(response)
    if loss_on_prompt or "text" in row:
        target_mask = [0.0] + [1.0] * (len(ids) - 1)
    n = seq_length + 1
    ids, target_mask = ids[:n], target_mask[:n]
    pad = n - len(ids)
    return ids + [tok.pad_id] * pad, target_mask + [0.0] * pad


class SFTDataset:
    """Tokenised examples with deterministic global batches."""

    def __init__(self, rows: list[dict], tok, seq_length: int, loss_on_prompt: bool = False):
        encoded = [encode_example(tok, r, seq_length, loss_on_prompt) for r in rows]
        self.ids = torch.tensor([e[0] for e in encoded], dtype=torch.long, device="cpu")  # host; batches move
        self.mask = torch.tensor([e[1] for e in encoded], dtype=torch.float32, device="cpu")[:, 1:]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def global_batch_indices(self, step: int, global_batch_size: int, seed: int) -> torch.Tensor:
        """Example indices of the global batch of ``step`` (epochs reshuffled with ``seed + epoch``)."""
        n = len(self)
        start = step * global_batch_size
        out = []
        while len(out) < global_batch_size:
            epoch, offset = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed + epoch), device="cpu")
            take = min(n - offset, global_batch_size - len(out))
            out.extend(perm[offset: offset + take].tolist())
        return torch.tensor(out, device="cpu")

    def micro_batches(self, step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int, seed: int) -> list[SFTBatch]:
        """This data-parallel rank's micro-batches of ``step`` (rank r takes a contiguous slice)."""
        idx = self.global_batch_indices(step, global_batch_size, seed)
        per_rank = global_batch_size // dp_size
        mine = idx[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        out = []
        for chunk in mine.split(micro_batch_size):
            ids = self.ids[chunk]
            out.append(SFTBatch(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=self.mask[chunk]))
        return out
