"""Summed token cross-entropy per model family, without materialising full-vocabulary logits.

For decoder-only models most positions are prompt tokens that carry no loss, and the output head over a
~50k vocabulary is a large share of the compute and nearly all of the activation memory. So the hidden
states entering the output head are captured, the head itself is run on one position only, and the loss
is computed on the answer positions alone, in chunks that are recomputed in the backward pass.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peft_nlg.formatting import IGNORE_INDEX

LOSS_CHUNK_ROWS = 4096


@contextmanager
def _captured_head_input(model: torch.nn.Module):
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep_and_shrink(_module, args):
        hidden = args[0]
        captured.append(hidden)
        # the model's own logits are not used: compute them for one position per row. Contiguous here too,
        # since this hook runs after models.contiguous_head_input's: a strided [rows, 1, hidden] view makes the
        # CPU's matrix product copy the head's weight once per row (2.8 s a call in bf16 for 32 rows, 5 ms
        # contiguous)
        return (hidden[:, -1:].contiguous(),)

    handle = head.register_forward_pre_hook(keep_and_shrink)
    try:
        yield head, captured
    finally:
        handle.remove()


def _chunk_ce(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # the head module itself, not its weight: an adapter on the head (LoRA targeting ``lm_head``, say) lives in
    # the module's forward, and ``head.weight`` would be the frozen base alone (no update, no gradient)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                          chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, h, head, t, use_reentrant=False)
        else:
            total = total + _chunk_ce(h, head, t)
    return total


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions whose next token is a target, in a [rows, width - 1] grid."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def decoder_only_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) for a causal LM, peft-wrapped or not.

    Training batches come without an attention mask (right padding) and with their target positions found
    on the host (``batching.training_batch``): finding them on the GPU would make the host wait there.
    """
    labels = batch["labels"]
    positions = batch["target_positions"] if "target_positions" in batch else target_positions(labels)
    with _captured_head_input(model) as (head, captured):
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    hidden = captured[-1]
    hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]  # drop virtual prompt tokens, if any
    selected = hidden[:, :-1].flatten(0, 1).index_select(0, positions)
    targets = labels[:, 1:].flatten().index_select(0, positions)
    return chunked_cross_entropy(selected, head, targets), positions.numel()


def encoder_decoder_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, number of target tokens) for a seq2seq LM; targets are short, so plain logits."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   use_cache=False).logits
    mask = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits.float()[mask], labels[mask], reduction="sum")
    return loss, int(mask.sum())


def summed_loss(model: torch.nn.Module, batch: dict, is_encoder_decoder: bool) -> tuple[torch.Tensor, int]:
    return (encoder_decoder_loss if is_encoder_decoder else decoder_only_loss)(model, batch)
