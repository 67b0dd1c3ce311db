"""Which key blocks MoBA's gate selects in one layer of a trained model, and how much of full
attention's probability mass that selection keeps.

    from megatron_moba.eval.block_selection import capture_qkv, select, selection_map, kept_mass
    cap = capture_qkv(model, layer=2, tokens=tokens)           # what the layer's core attention receives
    sel = select(cap.q, cap.k, chunk_size=64, topk=3)           # [S, Hq, topk], the kernels' own gate
    grid = selection_map(sel[:, head], chunk_size=64)          # [S, blocks]: FUTURE / SKIPPED / SELECTED / OWN
    kept = kept_mass(cap.q, cap.k, sel, 64, cap.softmax_scale) # [S, Hq]
    run("runs/demo/ckpt_moba", layer=2, out="runs/block_selection")   # a checkpoint end to end: PNG, JSON

``kept[t, h]`` is the share of query t's full causal attention probability (fp32
softmax(q.k * scale) over keys <= t) that falls on keys of the blocks MoBA selects for it (its own
block's keys up to t included).  Query head h reads kv head h // (Hq / Hkv).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from moba_kernels import moba_select_blocks

FUTURE, SKIPPED, SELECTED, OWN = -1, 0, 1, 2      # selection_map cell values
_TILE_BUDGET = 1 << 24                            # fp32 elements of one score tile in kept_mass


@dataclass
class Captured:
    q: torch.Tensor          # [S, Hq, d] as core attention receives it (after RoPE)
    k: torch.Tensor          # [S, Hkv, d]
    v: torch.Tensor          # [S, Hkv, d]
    out: torch.Tensor        # [S, Hq * d] the core attention's output
    softmax_scale: float


def find_layer(model, layer: int):
    """The attention layer number ``layer`` (1-based, global; in a HybridModel counted over its
    attention layers, as --moba-full-attn-layer-list)."""
    numbers = {model.config.attention_ordinal(m.layer_number): m for m in model.decoder.layers}
    numbers.pop(None, None)                    # a HybridModel's MLP layers
    if layer in numbers:
        return numbers[layer]
    raise ValueError(f"--layer {layer} is not in this model (attention layers {sorted(numbers)})")


@torch.no_grad()
def capture_qkv(model, layer: int, tokens: torch.Tensor) -> Captured:
    """Run tokens [S] through the model; return what layer ``layer``'s core attention got and gave."""
    core = find_layer(model, layer).self_attention.core_attention
    seen = {}

    def hook(module, args, kwargs, output):
        q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))
        if q.dim() != 4 or q.shape[1] != 1:
            raise ValueError(f"expected sbhd core-attention inputs [s, 1, h, d], got {tuple(q.shape)}")
        seen.update(q=q[:, 0], k=k[:, 0], v=v[:, 0], out=output[:, 0])                 # [S, H, d], out [S, H*d]

    device = next(model.parameters()).device
    tokens = tokens.to(device)[None]                                                    # [1, S]
    handle = core.register_forward_hook(hook, with_kwargs=True)
    try:
        model(tokens, torch.arange(tokens.shape[1], device=device)[None], attention_mask=None)
    finally:
        handle.remove()
    scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(seen["q"].shape[-1])
    return Captured(softmax_scale=float(scale), **{n: t.detach().float() for n, t in seen.items()})


def select(q: torch.Tensor, k: torch.Tensor, chunk_size: int, topk: int) -> torch.Tensor:
    """MoBA's selection for one sequence: q [S, Hq, d], k [S, Hkv, d] -> int32 [S, Hq, topk] (-1 padded)."""
    return moba_select_blocks(q[None], k[None], chunk_size, topk)[0]


def selection_map(sel: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """One head's selection sel [S, topk] -> int8 [S, blocks] of FUTURE / SKIPPED / SELECTED / OWN."""
    seqlen = sel.shape[0]
    blocks = -(-seqlen // chunk_size)
    own = torch.arange(seqlen, device=sel.device) // chunk_size                        # [S]
    past = torch.arange(blocks, device=sel.device)[None] <= own[:, None]              # [S, NB]
    grid = torch.where(past, SKIPPED, FUTURE).to(torch.int8)
    rows, cols = (sel >= 0).nonzero(as_tuple=True)
    grid[rows, sel[rows, cols].long()] = SELECTED
    grid[torch.arange(seqlen, device=sel.device), own] = OWN
    return grid


def block_map(grid: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """grid [S, NB] -> float [NB, NB]: per query block, the share of its queries that attend each
    key block (selected or own); NaN for key blocks after the query block."""
    seqlen, blocks = grid.shape
    attended = (grid >= SELECTED).float()                                              # [S, NB]
    qblock = torch.arange(seqlen, device=grid.device) // chunk_size                   # [S]
    sums = torch.zeros(blocks, blocks, device=grid.device).index_add_(0, qblock, attended)
    counts = torch.bincount(qblock, minlength=blocks).float()[:, None]                # [NB, 1]
    out = sums / counts
    return out.masked_fill(torch.ones(blocks, blocks, dtype=torch.bool, device=grid.device).triu(1), float("nan"))


@torch.no_grad()
def kept_mass(q: torch.Tensor, k: torch.Tensor, sel: torch.Tensor, chunk_size: int,
              softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Per query and head, the share of full causal attention probability that MoBA's selection keeps.

    q [S, Hq, d], k [S, Hkv, d], sel [S, Hq, topk] (as from ``select``) -> float32 [S, Hq].  Computed as
    1 - (mass on keys of unselected blocks), so it is exactly 1 where nothing is left out."""
    seqlen, hq, dim = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    blocks = -(-seqlen // chunk_size)
    pos = torch.arange(seqlen, device=q.device)
    key_block = pos // chunk_size                                                      # [S]
    tile = max(1, _TILE_BUDGET // max(seqlen, 1))
    out = torch.empty(seqlen, hq, dtype=torch.float32, device=q.device)
    for h in range(hq):
        kh = k[:, h // group].float()                                                  # [S, d]
        for t0 in range(0, seqlen, tile):
            t1 = min(seqlen, t0 + tile)
            scores = (q[t0:t1, h].float() @ kh.T) * scale                              # [n, S]
            causal = pos[None] <= pos[t0:t1, None]                                     # [n, S]
            p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)     # [n, S]
            chosen = torch.zeros(t1 - t0, blocks + 1, dtype=torch.bool, device=q.device)
            idx = sel[t0:t1, h].long()                                                 # [n, topk]
            chosen.scatter_(1, torch.where(idx < 0, blocks, idx), True)                # -1 pads -> spare column
            dropped = ~chosen[:, :blocks].gather(1, key_block[None].expand(t1 - t0, -1))   # [n, S]
            out[t0:t1, h] = 1.0 - (p * dropped).sum(-1)
    return out


def summarize(kept: torch.Tensor, chunk_size: int, topk: int) -> dict:
    """Averages of kept [S, Hq]: over all queries, and over the queries that had blocks to leave out
    (own block index >= topk), per head and overall."""
    own = torch.arange(kept.shape[0], device=kept.device) // chunk_size
    choosing = kept[own >= topk]                                                       # [n, Hq]
    out = dict(overall=kept.mean().item(), per_head=kept.mean(0).tolist(), queries=kept.shape[0])
    out["queries_with_a_choice"] = dict(
        overall=choosing.mean().item() if len(choosing) else None,
        per_head=choosing.mean(0).tolist() if len(choosing) else None, queries=choosing.shape[0])
    return out


def input_tokens(tokenizer, length: int, text_file: Optional[str] = None, data_path: Optional[str] = None,
                 doc: int = 0, seed: int = 0) -> tuple:
    """(tokens [S] int64 of at most ``length``, a description): from a text file, a document of an
    indexed dataset, or (neither given) random ids."""
    if text_file is not None and data_path is not None:
        raise ValueError("give either --text-file or --data-path, not both")
    if text_file is not None:
        if not os.path.isfile(text_file):
            raise ValueError(f"--text-file {text_file} does not exist")
        with open(text_file, encoding="utf-8", errors="replace") as f:
            ids, what = tokenizer.tokenize(f.read()), f"text file {text_file}"
    elif data_path is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        if not (os.path.isfile(data_path + ".bin") and os.path.isfile(data_path + ".idx")):
            raise ValueError(f"--data-path {data_path}: {data_path}.bin/.idx not found (give the prefix)")
        dataset = IndexedDataset(data_path)
        if not 0 <= doc < len(dataset):
            raise ValueError(f"--doc {doc} is out of range: {data_path} has {len(dataset)} documents")
        ids, what = dataset[doc].tolist(), f"document {doc} of {data_path}"
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, tokenizer.eod if tokenizer.name == "NullTokenizer" else tokenizer.vocab_size,
                            (length,), generator=g).tolist()
        what = f"random tokens (seed {seed})"
    if not ids:
        raise ValueError(f"the input ({what}) has no tokens")
    return torch.tensor(ids[:length], dtype=torch.long), what


def plot_selection(grid: torch.Tensor, chunk_size: int, title: str, path: str) -> str:
    """Two panels: per query token (selected blue, own block orange, skipped grey, future white), and
    per query block (share of its queries attending each key block; own block marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    seqlen, blocks = grid.shape
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.5))
    colors = ["white", "#dddddd", "tab:blue", "tab:orange"]                            # FUTURE..OWN
    a.imshow(grid.cpu().numpy() + 1, cmap=ListedColormap(colors), vmin=0, vmax=3, aspect="auto",
             interpolation="nearest", extent=(-0.5, blocks - 0.5, seqlen - 0.5, -0.5))
    a.set_xlabel("key block")
    a.set_ylabel("query position")
    a.set_title("per query token")
    a.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors[1:], ["skipped", "selected", "own block"])],
             loc="upper right", fontsize=8)
    share = block_map(grid, chunk_size).cpu().numpy()
    im = b.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    b.scatter(range(blocks), range(blocks), marker="s", s=max(4, 2000 / blocks), facecolors="none",
              edgecolors="tab:orange", label="own block")
    b.set_xlabel("key block")
    b.set_ylabel("query block")
    b.set_title("per query block: share of its queries attending")
    b.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=b)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_flags(load: str, layer: int, head: int = 0, length: Optional[int] = None,
                chunk_size: Optional[int] = None, topk: Optional[int] = None, iteration: Optional[int] = None):
    """The flag checks of tools/plot_block_selection.py against the checkpoint's saved flags, before
    any model is built: a ValueError naming the flag, else (saved flags, input length, the sequence
    length to load the checkpoint at (None: its own))."""
    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.eval.needle import check_lengths
    try:
        saved = saved_args(load, iteration)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--load {load}: {e}") from None
    from megatron_moba.core.hybrid_pattern import layer_counts
    pattern = getattr(saved, "hybrid_layer_pattern", None)
    layers = layer_counts(saved.num_layers, pattern)[0]
    if not 1 <= layer <= layers:
        raise ValueError(f"--layer {layer} is out of range: the checkpoint has layers 1..{layers} (1-based"
                         + (", counted over the attention layers of its --hybrid-layer-pattern" if pattern else "")
                         + ")")
    if not 0 <= head < saved.num_attention_heads:
        raise ValueError(f"--head {head} is out of range: the checkpoint has heads "
                         f"0..{saved.num_attention_heads - 1} (0-based)")
    for flag, value in (("--chunk-size", chunk_size), ("--topk", topk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    length = length or saved.seq_length
    return saved, length, check_lengths(saved, [length], "--length")


def run(load: str, layer: int, out: str, head: int = 0, text_file: Optional[str] = None,
        data_path: Optional[str] = None, doc: int = 0, length: Optional[int] = None,
        chunk_size: Optional[int] = None, topk: Optional[int] = None, seed: int = 0, label: Optional[str] = None,
        iteration: Optional[int] = None) -> dict:
    """What tools/plot_block_selection.py does: ``check_flags``, load the checkpoint, capture the layer's
    q/k on the input, select blocks, write OUT/block_selection_layer<L>_head<H>.png and .json and print
    the kept mass.  Returns the JSON's content.  A bad flag or input: ValueError naming the flag.
    Without CUDA the caller applies the CPU shim first (megatron_moba.training.compat.apply_patches)."""
    from megatron_moba.eval.checkpoint import load_for_eval
    _, length, eval_seq_length = check_flags(load, layer, head, length, chunk_size, topk, iteration)
    model, margs, tokenizer = load_for_eval(load, iteration, seq_length=eval_seq_length)
    tokens, what = input_tokens(tokenizer, length, text_file, data_path, doc, seed)
    chunk = chunk_size or margs.moba_chunk_size
    topk = topk or margs.moba_topk
    cap = capture_qkv(model, layer, tokens)                           # q [S, Hq, d], k [S, Hkv, d]
    sel = select(cap.q, cap.k, chunk, topk)                           # [S, Hq, topk]
    kept = kept_mass(cap.q, cap.k, sel, chunk, cap.softmax_scale)     # [S, Hq]
    summary = summarize(kept, chunk, topk)
    heads, kv_heads = cap.q.shape[1], cap.k.shape[1]
    kv_head = head // (heads // kv_heads)
    is_moba = model.config.is_moba_layer(layer)
    label = label or os.path.basename(os.path.normpath(load))
    if not is_moba:
        note = (f"\n(layer {layer} runs full attention in this checkpoint: the map shows what MoBA would "
                "select there)")
    elif (chunk, topk) != (margs.moba_chunk_size, margs.moba_topk):
        note = (f"\n(layer {layer} was trained with chunk {margs.moba_chunk_size}, top-{margs.moba_topk}: "
                "the map shows what MoBA with these settings would select)")
    else:
        note = ""
    head_kept = summary["per_head"][head]
    title = (f"{label}: layer {layer}, head {head} (kv head {kv_head}), MoBA chunk {chunk}, top-{topk}, "
             f"input: {what}, {len(tokens)} tokens\nkept attention mass: head {head_kept:.3f}, all heads "
             f"{summary['overall']:.3f}{note}")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"block_selection_layer{layer}_head{head}")
    plot_selection(selection_map(sel[:, head], chunk), chunk, title, stem + ".png")
    result = dict(load=load, label=label, layer=layer, head=head, kv_head=kv_head,
                  layer_attention="moba" if is_moba else "full", variant=margs.attention, chunk_size=chunk,
                  topk=topk, trained_chunk_size=margs.moba_chunk_size, trained_topk=margs.moba_topk,
                  tokens=len(tokens), blocks=-(-len(tokens) // chunk), input=what, kept_mass=summary)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    choice = summary["queries_with_a_choice"]
    print(f"layer {layer} ({result['layer_attention']} in the checkpoint), chunk {chunk}, top-{topk}, "
          f"{len(tokens)} tokens: kept attention mass {summary['overall']:.4f} over all heads, "
          f"head {head}: {head_kept:.4f}")
    if choice["overall"] is not None:
        print(f"  queries past the first {topk} blocks ({choice['queries']}): {choice['overall']:.4f} over all heads, "
              f"per head {' '.join(f'{x:.4f}' for x in choice['per_head'])}")
    print(f"wrote {stem}.png\nwrote {stem}.json")
    return result
