#!/usr/bin/env python
"""The demo (`make demo`): pretrain a tiny MoBA GPT on CPU and compare it with full attention.

    python examples/demo_pretrain.py [--out runs/demo] [--train-iters 200]

1. corpus: the Python standard library's own source files (real, long documents; no download);
2. a SentencePiece tokenizer trained on them, and megatron's indexed dataset (.bin/.idx);
3. two runs of the same model through `python -m megatron_moba.pretrain`: MoBA (chunk 64,
   top-3, last layer full attention) and full attention, each saving a checkpoint and
   evaluating on held-out documents;
4. runs/demo/loss_curves.png: both loss curves.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from megatron_moba.training.preprocess import build_indexed_dataset, stdlib_corpus, train_sentencepiece


def train(name, data, tok, out, args, extra):
    cmd = [sys.executable, "-m", "megatron_moba.pretrain",
           "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
           "--seq-length", "512", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
           "--moba-chunk-size", "64", "--moba-topk", "3", "--moba-full-attn-layers", "1",
           "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(args.train_iters),
           "--lr", "2e-3", "--min-lr", "2e-4",
           "--lr-warmup-iters", str(min(max(1, args.train_iters // 10), args.train_iters - 1)),
           "--clip-grad", "1.0", "--seed", "1",
           "--data-path", data, "--split", "95,5,0", "--data-cache-path", os.path.join(out, "cache"),
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
           "--log-interval", "10", "--eval-interval", str(args.train_iters // 2), "--eval-iters", "4",
           "--save", os.path.join(out, f"ckpt_{name}"), "--metrics-file", os.path.join(out, f"metrics_{name}.jsonl")]
    metrics = os.path.join(out, f"metrics_{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    # each demo run starts afresh: the job refuses a --save directory holding another run's checkpoints
    shutil.rmtree(os.path.join(out, f"ckpt_{name}"), ignore_errors=True)
    print(f"\n== training {name} ==", flush=True)
    subprocess.run(cmd + extra, check=True)     # the job quiets megatron's notices that do not apply
    return [json.loads(line) for line in open(metrics)]


def plot(runs: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"moba": "tab:blue", "full": "tab:red"}
    labels = {"moba": "MoBA (chunk 64, top-3)", "full": "Full attention"}
    for name, rows in runs.items():
        train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
        valid = [(r["iteration"], r["valid_loss"]) for r in rows if "valid_loss" in r]
        ax.plot(*zip(*train), color=colors[name], label=f"{labels[name]}: train")
        if valid:
            ax.plot(*zip(*valid), "o--", color=colors[name], label=f"{labels[name]}: validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss")
    ax.set_title("Tiny GPT on the Python standard library (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    corpus = os.path.join(args.out, "corpus.jsonl")
    n = stdlib_corpus(corpus, args.corpus_bytes)
    texts = lambda: (json.loads(line)["text"] for line in open(corpus))
    tok = train_sentencepiece(texts(), os.path.join(args.out, "spm"), args.vocab_size)
    data = os.path.join(args.out, "stdlib")
    stats = build_indexed_dataset(texts(), data, "SentencePieceTokenizer", tok, workers=2, progress=False)
    print(f"corpus: {n} stdlib files, {stats['tokens']} tokens (vocab {stats['vocab_size']}) "
          f"[{time.time() - t0:.0f} s]", flush=True)
    runs = {"moba": train("moba", data, tok, args.out, args, []),
            "full": train("full", data, tok, args.out, args, ["--attention", "full"])}
    png = os.path.join(args.out, "loss_curves.png")
    plot(runs, png)
    print("\n== summary ==")
    for name, rows in runs.items():
        train_losses = [r["loss"] for r in rows if "loss" in r]
        valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
        print(f"{name:>5}: train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}, "
              f"final validation loss {valid[-1]:.3f}, checkpoint {os.path.join(args.out, 'ckpt_' + name)}")
    print(f"loss curves: {png}   [{time.time() - t0:.0f} s in all]")


if __name__ == "__main__":
    main()
