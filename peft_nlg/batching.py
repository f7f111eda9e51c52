"""Length-grouped batches under a token budget, and padding them into tensors.

Sorting by length before cutting batches keeps padding waste small; the order of the batches is then
shuffled (seeded), so training still sees a mixed stream.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from peft_nlg.formatting import IGNORE_INDEX
from peft_nlg.loss import target_positions


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int,
                         shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Group example indices so that (batch size x longest length) stays within ``max_tokens``."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random() if shuffle else i))
    batches, current, longest = [], [], 0
    for index in order:
        new_longest = max(longest, lengths[index])
        if current and (new_longest * (len(current) + 1) > max_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], lengths[index]
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def split_for_memory(batch: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """A batch's rows in length-grouped chunks of at most ``max_tokens`` padded tokens each (a longer row stays
    alone); 0: no limit. The chunks' summed losses are the batch's, so their gradients add up to the same step,
    with a fraction of the activations held at once."""
    if not max_tokens or len(batch) * max(lengths[i] for i in batch) <= max_tokens:
        return [batch]
    chunks = token_budget_batches([lengths[i] for i in batch], max_tokens, len(batch))
    return [[batch[j] for j in chunk] for chunk in chunks]


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate(features: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of encoded examples; labels are padded with IGNORE_INDEX so padding never counts."""
    input_ids = [f["input_ids"] for f in features]
    batch = {"input_ids": _pad(input_ids, pad_token_id, padding_side),
             "attention_mask": _pad([[1] * len(r) for r in input_ids], 0, padding_side)}
    if "labels" in features[0]:
        batch["labels"] = _pad([f["labels"] for f in features], IGNORE_INDEX, padding_side)
    return batch


def real_tokens(batch: dict, is_encoder_decoder: bool) -> int:
    """Non-padding tokens the model processes: prompt and answer, on both sides for encoder-decoder."""
    n = int(batch["attention_mask"].sum())
    if is_encoder_decoder and "labels" in batch:
        n += int((batch["labels"] != IGNORE_INDEX).sum())
    return n


def training_batch(features: list[dict], pad_token_id: int, is_encoder_decoder: bool) -> tuple[dict, int, int]:
    """A right-padded batch for the loss, with its target and real token counts taken on the host.

    Decoder-only batches carry no attention mask: with right padding and causal attention no real token
    can see a pad, so the mask changes nothing that enters the loss, and without it attention runs as
    plain causal attention (flash kernels). Counting targets and finding their positions on the host keeps
    the GPU queue free of syncs.
    """
    batch = collate(features, pad_token_id, "right")
    n_targets = int((batch["labels"] != IGNORE_INDEX).sum())
    n_real = real_tokens(batch, is_encoder_decoder)
    if not is_encoder_decoder:
        del batch["attention_mask"]
        batch["target_positions"] = target_positions(batch["labels"])
    return batch, n_targets, n_real
