"""Scoring long sequences in memory linear in the tokens, under tensor and context parallelism.

    from megatron_moba.eval.stream import streamed_token_losses, logits_at
    losses = streamed_token_losses(model, tokens)          # tokens [b, s+1] -> loss [b, s] float32
    logits = logits_at(model, tokens, [n - 3, n - 2, n - 1], vocab_size)   # [b, 3, vocab] float32

Neither holds a ``[tokens, vocab]`` tensor.  The model runs to its final hidden states ([s, b, h]:
the output layer is bypassed for that forward); the output layer then runs on pieces of
``piece_tokens`` tokens, each piece's loss through the model's own ``compute_language_model_loss``
(megatron's vocab-parallel cross entropy), or only at the positions asked for.

Under context parallelism (the model built with --context-parallel-size cp, run on every rank of
the CP group with the same ``tokens``) each rank feeds its load-balanced chunks r and 2cp-1-r of
the sequence (padded at its end to a multiple of 2cp: causal attention keeps padding out of the
real positions), and the results are gathered, so every rank returns the whole answer.  Under
tensor parallelism the pieces' logits stay split over the vocabulary (the cross entropy is
vocab-parallel); ``logits_at`` gathers its few rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_moba.core.context_parallel import cp_token_index

PIECE_TOKENS = 2048          # tokens (over the batch) whose logits are held at once


@contextmanager
def _hidden_out(model):
    """While inside, the model's forward returns its final hidden states [b, s, h] instead of logits."""
    layer = model.output_layer
    layer.forward = lambda hidden_states, *args, **kwargs: (hidden_states, None)
    try:
        yield
    finally:
        del layer.forward


def _cp_layout(length: int):
    """(padded length, this CP rank's global token indices [length / cp]) for a sequence of ``length``."""
    cp = ps.get_context_parallel_world_size()
    padded = -(-length // (2 * cp)) * (2 * cp)
    return padded, cp_token_index([0, padded], cp, ps.get_context_parallel_rank())


def _pad(x: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def _gather_cp(local: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Per-rank values along ``dim`` in CP-local order -> the whole sequence in global order."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return local
    group = ps.get_context_parallel_group()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    order = torch.cat([cp_token_index([0, length], cp, r, local.device) for r in range(cp)])
    out = torch.empty_like(torch.cat(parts, dim))
    out.index_copy_(dim, order, torch.cat(parts, dim))
    return out


def final_hidden(model, tokens: torch.Tensor):
    """This rank's final hidden states [s_local, b, h] of ``tokens`` [b, n] (the whole sequence, the
    same on every rank), with the padded length and this rank's global token indices."""
    device = next(model.parameters()).device
    padded, index = _cp_layout(tokens.shape[1])
    index = index.to(device)
    local = _pad(tokens.to(device), padded)[:, index]                               # [b, s_local]
    positions = index.clamp(max=tokens.shape[1] - 1)[None].expand_as(local)         # padding: any valid position
    with _hidden_out(model):
        hidden = model(local, positions, attention_mask=None)                        # [b, s_local, h]
    return hidden.transpose(0, 1), padded, index


def _output_layer(model, hidden: torch.Tensor) -> torch.Tensor:
    """[p, b, h] -> this TP rank's logits [p, b, padded vocab / tp] (megatron's output layer)."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    return model.output_layer(hidden, weight=weight)[0]


@torch.no_grad()
def streamed_token_losses(model, tokens: torch.Tensor, piece_tokens: int = PIECE_TOKENS) -> torch.Tensor:
    """Per-token LM loss: ``tokens`` [b, s+1] -> [b, s] float32 (on the tokens' device), the loss of
    predicting token t+1, as the model's own loss computes it; never more than ``piece_tokens``
    rows of logits at once."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    hidden, padded, index = final_hidden(model, inputs)
    labels = _pad(labels.to(hidden.device), padded)[:, index]                       # [b, s_local]
    step = max(1, piece_tokens // b)
    losses = torch.cat([model.compute_language_model_loss(labels[:, a:a + step],
                                                          _output_layer(model, hidden[a:a + step])).float()
                        for a in range(0, hidden.shape[0], step)], dim=1)           # [b, s_local]
    return _gather_cp(losses, 1, padded)[:, :s].to(tokens.device)


@torch.no_grad()
def logits_at(model, tokens: torch.Tensor, positions: Sequence[int], vocab_size: int) -> torch.Tensor:
    """Logits of the next token after each of ``positions`` of ``tokens`` [b, n]: [b, len(positions),
    vocab_size] float32 (padding rows of the vocabulary cut), the same on every rank."""
    hidden, padded, index = final_hidden(model, tokens)
    where = torch.full((padded,), -1, dtype=torch.long, device=hidden.device)
    where[index] = torch.arange(index.numel(), device=hidden.device)
    rows = where[torch.as_tensor(list(positions), device=hidden.device)]            # -1: held by another CP rank
    picked = hidden.new_zeros(len(rows), *hidden.shape[1:])                          # [k, b, h]
    mine = rows >= 0
    picked[mine] = hidden[rows[mine]]
    if ps.get_context_parallel_world_size() > 1:           # each row is held by one rank, zeros elsewhere
        dist.all_reduce(picked, group=ps.get_context_parallel_group())
    logits = _output_layer(model, picked)                                            # [k, b, V/tp]
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)   # [k, b, V]
    return logits[..., :vocab_size].float().transpose(0, 1).to(tokens.device)
