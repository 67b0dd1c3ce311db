"""Passkey (needle-in-a-haystack) retrieval: prompts in token space, greedy scoring, tables, heat maps.

    from megatron_moba.eval.needle import PromptBuilder, model_logits_fn, evaluate
    builder = PromptBuilder(tokenizer)
    prompt = builder.build(length=4096, depth=0.5, passkey="48213")
    rows = evaluate(model_logits_fn(model, tokenizer.vocab_size), builder, [1024, 4096], [0, 0.5, 1], passkeys)
    # or, checkpoints end to end (tools/eval_needle.py): tables, heat maps, needle.csv/.json
    run(["runs/demo/ckpt_moba", "runs/demo/ckpt_full"], [256, 512, 1024], "runs/needle")

A prompt of ``length`` tokens (the prompt plus the answer tokens) is filler sentences repeated (the
filler ends with a whole sentence; its first one may be cut), the needle inserted at the sentence
boundary nearest to token ``depth * filler tokens`` (0 = first token, 1 = right before the
question), and the question last.  Text tokenizers (SentencePiece, HF) get

    filler    " The grass is green." " The sky is blue." " The sun is yellow." " Here we go." " There and back again."
    needle    " The pass key is 48213. Remember it. 48213 is the pass key."
    question  " What is the pass key? The pass key is"         answer: the tokens of " 48213" after it

each piece tokenized on its own (every piece opens with a space, so the pieces join as text would).
NullTokenizer (text is space-separated integer ids) gets an integer prompt with reserved ids:
digit d is id d (0-9), ``KEY`` = 10, ``KEY_END`` = 11, ``QUERY`` = 12, filler is a fixed repeating
pattern of ids >= 13 (every token a "sentence", so the depth is exact to the token); needle
``KEY d1..dn KEY_END``, question ``QUERY KEY``, answer ``d1..dn``: an induction/copy task (after
``QUERY KEY``, copy what followed the earlier ``KEY``).

RULER-style variants (``PromptBuilder(tokenizer, task, needles)``): "multikey" hides ``needles`` needles
" The pass key of {name} is {key}. ..." of distinct names (words; integer prompts: ``KEY n1 n2 KEY_END
d1..dn KEY_END``) and asks " What is the pass key of {name}? The pass key of {name} is" (``QUERY KEY n1
n2 KEY_END``); "multivalue" hides ``needles`` keys of one name (" One of the pass keys of {name} is
{key}.") and asks for all of them, in the order they appear (", "-separated; integer: ``KEY_END``).

A trial is correct when greedy decoding reproduces every answer token.  Decoding never forms the
[tokens, vocabulary] logits: the prompt and the expected answer run through the model once, and the
greedy token after every prefix of the answer is read from that one forward (``greedy_decode``: a
right answer costs one forward, a wrong one at most one more per token after its first error).
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

FILLER = [" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again."]
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
# RULER-style variants (--task): several needles with named keys, one asked (multikey), or several values
# of one key, all asked, in the order they appear (multivalue)
NEEDLE_OF = " The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
QUESTION_OF = " What is the pass key of {name}? The pass key of {name} is"
VALUE_OF = " One of the pass keys of {name} is {key}."
VALUES_OF = " What are all the pass keys of {name}? The pass keys of {name} are"
NAMES = ["apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket", "kettle",
         "lantern", "meadow", "orchard", "pepper", "river"]
TASKS = ("passkey", "multikey", "multivalue")
KEY, KEY_END, QUERY, FIRST_FILLER = 10, 11, 12, 13      # NullTokenizer ids (digits are 0-9)
FILLER_IDS = 64                                          # length of the NullTokenizer filler pattern
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)                     # default needle depths (fractions of the filler)


@dataclass
class Prompt:
    tokens: List[int]       # the prompt; len(tokens) + len(answer) == length
    answer: List[int]       # the tokens greedy decoding must produce
    passkey: str
    needle_start: int       # index in tokens of the needle's first token
    needle_len: int


class PromptBuilder:
    """Builds passkey prompts for one tokenizer (see the module docstring); ``task`` "multikey" or
    "multivalue" builds the RULER-style variants with ``needles`` needles (see ``build``)."""

    def __init__(self, tokenizer, task: str = "passkey", needles: int = 4):
        self.check_task(task, needles)
        self.task, self.needles = task, needles
        self.tokenizer = tokenizer
        self.integer = tokenizer.name == "NullTokenizer"
        if self.integer:            # filler: ids from FIRST_FILLER up, but the end-of-document id
            span = [i for i in range(FIRST_FILLER, tokenizer.vocab_size) if i != tokenizer.eod]
            if len(span) < 3:
                raise ValueError(f"the NullTokenizer vocabulary ({tokenizer.vocab_size - 1}) is too small for the "
                                 f"passkey prompt: it needs ids 0..{FIRST_FILLER + 2}")
            self.sentences = [[i] for i in random.Random(0).choices(span, k=min(FILLER_IDS, len(span) * 4))]
        else:
            self.sentences = [tokenizer.tokenize(sentence) for sentence in FILLER]
            self.question = tokenizer.tokenize(QUESTION)

    @staticmethod
    def check_task(task: str, needles: int) -> None:
        if task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
        if task != "passkey" and not 2 <= needles <= len(NAMES):
            raise ValueError(f"--needles must be between 2 and {len(NAMES)} for --task {task}, got {needles}")

    def pieces(self, passkey: str):
        """(needle, question, answer) token lists for one passkey."""
        if self.integer:
            digits = [int(c) for c in passkey]
            return [KEY, *digits, KEY_END], [QUERY, KEY], digits
        tok = self.tokenizer.tokenize
        whole = tok(QUESTION + " " + passkey)
        n = len(self.question)
        answer = whole[n:] if whole[:n] == self.question else tok(" " + passkey)
        return tok(NEEDLE.format(key=passkey)), list(self.question), answer

    def haystack(self, room: int):
        """``room`` filler tokens ending with a whole sentence, and the sentence boundaries in them."""
        tokens, ends = [], []
        while len(tokens) < room:
            tokens += self.sentences[len(ends) % len(self.sentences)]
            ends.append(len(tokens))
        cut = len(tokens) - room
        return tokens[cut:], sorted({0} | {e - cut for e in ends if e >= cut})

    def build(self, length: int, depth: float, passkey: str) -> Prompt:
        """The prompt of ``length`` tokens (answer included) for one trial.  "passkey": one needle at
        ``depth``.  "multikey": ``needles`` needles of distinct names, the asked one (value ``passkey``)
        at ``depth``, the others (other values) at random sentence boundaries.  "multivalue": ``needles``
        needles of one name, the first (value ``passkey``) at ``depth``, the others at random boundaries;
        the answer is every value, in the order they appear.  The names, other values and places are
        drawn from ``passkey`` (the same in every cell)."""
        if self.task == "passkey":
            needle, question, answer = self.pieces(passkey)
            needles, places = [needle], []
        else:
            needles, question, values, places, asked = self._variant(passkey)
            answer = self._answer(values, range(len(values)), asked)      # multivalue: reordered below
        fixed = sum(map(len, needles)) + len(question) + len(answer)
        room = length - fixed                                            # filler tokens
        if room < 0:
            raise ValueError(f"--lengths {length} is too short: the needle{'s' if len(needles) > 1 else ''}, "
                             f"question and answer alone take {fixed} tokens")
        haystack, bounds = self.haystack(room)
        at = [min(bounds, key=lambda b: (abs(b - depth * room), b))]
        at += [bounds[min(int(p * len(bounds)), len(bounds) - 1)] for p in places]   # the other needles
        order = sorted(range(len(needles)), key=lambda i: (at[i], i))
        tokens, start, prev = [], 0, 0
        for i in order:
            tokens += haystack[prev:at[i]]
            start = len(tokens) if i == 0 else start
            tokens += needles[i]
            prev = at[i]
        tokens += haystack[prev:] + question
        if self.task == "multivalue":      # the values in the order they appear (text: may tokenize longer or shorter)
            answer = self._answer(values, order, asked)
            extra = len(tokens) + len(answer) - length
            if extra < 0:
                tokens, start = self.haystack(-extra)[0] + tokens, start - extra
            elif extra > 0 and min(at) >= extra:
                tokens, start = tokens[extra:], start - extra
            elif extra > 0:                                              # no filler before the first needle
                cut = len(tokens) - len(question)
                tokens = tokens[:cut - extra] + tokens[cut:]
        return Prompt(tokens, answer, passkey, start, len(needles[0]))

    def _variant(self, passkey: str):
        """(needle token lists, question, values, places in [0, 1) of the needles after the first, the
        question as text) of a multikey or multivalue trial."""
        rng = random.Random(f"{self.task}:{passkey}")
        low, high = 10 ** (len(passkey) - 1), 10 ** len(passkey) - 1
        values = [passkey]
        while len(values) < self.needles:
            v = str(rng.randint(low, high))
            if v not in values:
                values.append(v)
        places = [rng.random() for _ in values[1:]]
        if self.integer:
            names = [[int(c) for c in f"{n:02d}"] for n in rng.sample(range(100), self.needles)]
            if self.task == "multivalue":
                names = [names[0]] * self.needles
            needles = [[KEY, *name, KEY_END, *map(int, v), KEY_END] for name, v in zip(names, values)]
            return needles, [QUERY, KEY, *names[0], KEY_END], values, places, None
        tok = self.tokenizer.tokenize
        names = rng.sample(NAMES, self.needles)
        if self.task == "multikey":
            needles = [tok(NEEDLE_OF.format(name=n, key=v)) for n, v in zip(names, values)]
            asked = QUESTION_OF.format(name=names[0])
        else:
            needles = [tok(VALUE_OF.format(name=names[0], key=v)) for v in values]
            asked = VALUES_OF.format(name=names[0])
        return needles, tok(asked), values, places, asked

    def _answer(self, values: List[str], order, asked: Optional[str]) -> List[int]:
        """The answer tokens: the asked value (multikey), or the values in ``order`` (multivalue); integer
        prompts separate values by KEY_END, text by ", " (tokenized after the question, as text would be)."""
        values = [values[0]] if self.task == "multikey" else [values[i] for i in order]
        if self.integer:
            out = []
            for v in values:
                out += [*map(int, v), KEY_END]
            return out[:-1]
        tok = self.tokenizer.tokenize
        text = " " + ", ".join(values)
        whole, question = tok(asked + text), tok(asked)
        return whole[len(question):] if whole[:len(question)] == question else tok(text)


def make_passkeys(trials: int, digits: int = 5, seed: int = 0) -> List[str]:
    """``trials`` random passkeys of ``digits`` digits (no leading zero); the same for every cell."""
    rng = random.Random(seed)
    return [str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)) for _ in range(trials)]


def model_logits_fn(model, vocab_size: int) -> Callable[..., torch.Tensor]:
    """A GPT from load_for_eval as a function tokens [b, n] -> logits [b, n, vocab_size] of every position
    (padding rows cut), or with ``last=k`` of the last k positions only ([b, k, vocab_size]; no
    [n, vocab] logits are formed: megatron_moba.eval.stream.logits_at).  Under tensor or context
    parallelism every rank of the model calls it with the same tokens and gets the whole answer."""
    from megatron_moba.eval.stream import logits_at

    def logits(tokens: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        n = tokens.shape[1]
        return logits_at(model, tokens, range(n - (n if last is None else last), n), vocab_size)
    logits.last_positions = True
    return logits


def greedy_decode(logits_fn, tokens: torch.Tensor, steps: int, guess: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy continuation: tokens [b, n] -> generated [b, steps].

    A ``logits_fn`` that takes ``last`` (``model_logits_fn``) is run on the prompt followed by a guess
    of the continuation (``guess`` [b, >= steps - 1], e.g. the expected answer; else token 0): one
    causal forward gives the greedy token after every guessed prefix, so the guess is accepted up to
    its first token that differs from the greedy one, which is corrected, and the rows not yet complete
    are run again.  The result is exactly greedy decoding; a right guess takes one forward, a wrong one
    at most one more per token after its first error.  Any other ``logits_fn`` (tokens [b, n] ->
    logits [b, n', V] of the last n' positions) is re-run on the whole sequence per token."""
    if steps == 0:
        return tokens[:, :0]
    if not getattr(logits_fn, "last_positions", False):
        seq = tokens
        for _ in range(steps):
            nxt = logits_fn(seq)[:, -1].argmax(-1)                                  # [b]
            seq = torch.cat([seq, nxt[:, None].to(seq)], dim=1)
        return seq[:, tokens.shape[1]:]
    b = tokens.shape[0]
    fed = torch.zeros(b, steps, dtype=tokens.dtype)              # the continuation (its last token is never fed)
    if guess is not None:
        fed[:, :steps - 1] = torch.as_tensor(guess)[:, :steps - 1]
    done = torch.zeros(b, dtype=torch.long)                     # leading tokens of ``fed`` known greedy, per row
    while bool((done < steps).any()):
        rows = torch.nonzero(done < steps).squeeze(1)
        seq = torch.cat([tokens[rows], fed[rows, :steps - 1]], dim=1)             # [r, n + steps - 1]
        best = logits_fn(seq, last=steps).argmax(-1).to(fed)      # [r, steps]: the greedy token after each prefix
        for j, row in enumerate(rows.tolist()):
            k = int(done[row])
            while True:                                         # best[j, k] is greedy: fed[row, :k] is
                agree = k < steps - 1 and bool(fed[row, k] == best[j, k])
                fed[row, k] = best[j, k]
                k += 1
                if k == steps or not agree:
                    break
            fed[row, k:] = best[j, k:]                          # after a wrong guess: guesses again
            done[row] = k
    return fed


def score(logits_fn, prompts: Sequence[Prompt], batch_size: int = 8) -> List[List[int]]:
    """Greedy continuations of the prompts, as many tokens as each answer (prompts of equal
    prompt and answer lengths are decoded together; the answers are the guesses of ``greedy_decode``)."""
    out: List[Optional[List[int]]] = [None] * len(prompts)
    groups: Dict[tuple, List[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(p.tokens), len(p.answer)), []).append(i)
    for (_, steps), idx in groups.items():
        for b0 in range(0, len(idx), batch_size):
            chunk = idx[b0:b0 + batch_size]
            tokens = torch.tensor([prompts[i].tokens for i in chunk], dtype=torch.long)     # [b, n]
            guess = torch.tensor([prompts[i].answer for i in chunk], dtype=torch.long)      # [b, steps]
            generated = greedy_decode(logits_fn, tokens, steps, guess).tolist()         # [b, steps]
            for i, g in zip(chunk, generated):
                out[i] = g
    return out


def evaluate(logits_fn, builder: PromptBuilder, lengths: Sequence[int], depths: Sequence[float],
             passkeys: Sequence[str], batch_size: int = 8, progress: bool = False) -> List[dict]:
    """One row per (length, depth): accuracy over the passkeys, and each trial's greedy output."""
    from tqdm import tqdm
    cells = [(n, d) for n in lengths for d in depths]
    rows = []
    for length, depth in tqdm(cells, desc="needle", unit="cell", disable=not progress):
        prompts = [builder.build(length, depth, key) for key in passkeys]
        generated = score(logits_fn, prompts, batch_size)
        correct = [g == p.answer for g, p in zip(generated, prompts)]
        rows.append(dict(length=length, depth=depth, accuracy=sum(correct) / len(correct), trials=len(correct),
                         correct=sum(correct), passkeys=list(passkeys),
                         predictions=[builder.tokenizer.detokenize(g) for g in generated]))
    return rows


def check_lengths(args, lengths: Sequence[int], flag: str = "--lengths") -> Optional[int]:
    """The sequence length to load the checkpoint at (None: its own), or a ValueError naming ``flag``."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"{flag} must be positive integers, got {list(lengths)}")
    longest = max(lengths)
    if longest <= args.seq_length:
        return None
    if args.position_embedding_type != "rope":
        raise ValueError(f"{flag} {longest} exceeds the checkpoint's --seq-length {args.seq_length}, and its "
                         f"{args.position_embedding_type} position embeddings do not extend (only RoPE checkpoints "
                         "can be evaluated beyond their training length)")
    return longest


def write_table(rows: List[dict], out_dir: str) -> List[str]:
    """needle.json (rows with the trials' predictions) and needle.csv (the accuracy table)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "needle.json"), os.path.join(out_dir, "needle.csv")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=1)
    fields = ["label", "variant", "length", "depth", "accuracy", "trials"]
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return paths


def format_table(rows: List[dict]) -> str:
    """Accuracy as text: one block per checkpoint, depths down, lengths across."""
    lines = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        lengths, depths = sorted({r["length"] for r in mine}), sorted({r["depth"] for r in mine})
        acc = {(r["length"], r["depth"]): r["accuracy"] for r in mine}
        task = mine[0].get("task", "passkey")
        task = "" if task == "passkey" else f", {task} with {mine[0]['needles']} needles"
        lines.append(f"{label} ({mine[0]['variant']}{task}), accuracy over {mine[0]['trials']} trials")
        lines.append("depth \\ length " + "".join(f"{n:>8}" for n in lengths))
        lines += [f"{d:>14.2f} " + "".join(f"{acc[(n, d)]:>8.2f}" for n in lengths) for d in depths]
    return "\n".join(lines)


def plot_heatmap(rows: List[dict], path: str) -> str:
    """Accuracy of one checkpoint as a depth x length heat map (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    acc = torch.full((len(depths), len(lengths)), float("nan"))                   # [depths, lengths]
    for r in rows:
        acc[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    im = ax.imshow(acc.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            a = acc[i, j].item()
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if a < 0.2 or a > 0.85 else "black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    r = rows[0]
    ax.set_title(f"{r['label']} ({r['variant']}): passkey accuracy, {r['trials']} trials per cell", fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def check_flags(loads: Sequence[str], lengths: Sequence[int], labels: Optional[Sequence[str]] = None,
                depths: Sequence[float] = DEPTHS, trials: int = 10, digits: int = 5, batch_size: int = 8,
                iteration: Optional[int] = None) -> list:
    """The flag checks of tools/eval_needle.py, before any model is built: a ValueError naming the flag,
    else each checkpoint's saved flags."""
    from megatron_moba.eval.checkpoint import saved_args
    if labels is not None and len(labels) != len(loads):
        raise ValueError(f"--labels has {len(labels)} names for {len(loads)} --load checkpoints")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {list(depths)}")
    for flag, value in (("--trials", trials), ("--digits", digits), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    saved = []
    for load in loads:
        try:
            saved.append(saved_args(load, iteration))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--load {load}: {e}") from None
        check_lengths(saved[-1], lengths)
    return saved


def run(loads: Sequence[str], lengths: Sequence[int], out: str, labels: Optional[Sequence[str]] = None,
        depths: Sequence[float] = DEPTHS, trials: int = 10, digits: int = 5, seed: int = 0, batch_size: int = 8,
        iteration: Optional[int] = None, progress: bool = True, tensor_model_parallel_size: int = 1,
        context_parallel_size: int = 1, tokenizer: Optional[dict] = None, task: str = "passkey",
        needles: int = 4) -> List[dict]:
    """What tools/eval_needle.py does: ``check_flags``, then per checkpoint load it, run every (length, depth)
    cell and write OUT/needle_<label>.png; print the accuracy table and write OUT/needle.csv and .json.
    Returns the rows.  Under torchrun, ``tensor_model_parallel_size`` x ``context_parallel_size``
    processes share each model; every rank returns the rows, rank 0 prints and writes them.  ``tokenizer``:
    overrides of the saved tokenizer flags (checkpoint.tokenizer_overrides).  ``task``, ``needles``: the
    RULER-style variants (``PromptBuilder.build``).  A bad flag or a tokenizer that cannot build the
    prompt: ValueError (the message names the flag, or the checkpoint's label).  Without CUDA the caller
    applies the CPU shim first (megatron_moba.training.compat.apply_patches)."""
    import torch.distributed as dist

    from megatron_moba.eval.checkpoint import check_parallel_sizes, load_for_eval
    check_parallel_sizes(tensor_model_parallel_size, context_parallel_size)
    PromptBuilder.check_task(task, needles)
    overrides = dict(tokenizer or {})
    saved = check_flags(loads, lengths, labels, depths, trials, digits, batch_size, iteration)
    labels = labels or [os.path.basename(os.path.normpath(p)) for p in loads]
    passkeys = make_passkeys(trials, digits, seed)
    rows = []
    first = not dist.is_initialized() or dist.get_rank() == 0
    if first:
        os.makedirs(out, exist_ok=True)
    for load, label, flags in zip(loads, labels, saved):
        seq_length = check_lengths(flags, lengths)     # None: the trained length suffices
        model, margs, tokenizer = load_for_eval(load, iteration, seq_length=seq_length,
                                                tensor_model_parallel_size=tensor_model_parallel_size,
                                                context_parallel_size=context_parallel_size, **overrides)
        first = dist.get_rank() == 0
        builder = PromptBuilder(tokenizer, task, needles)
        try:
            for key in passkeys:
                builder.build(min(lengths), 0.0, key)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        mine = evaluate(model_logits_fn(model, tokenizer.vocab_size), builder, lengths, sorted(depths), passkeys,
                        batch_size, progress=progress and first)
        info = dict(label=label, variant=margs.attention, task=task, needles=1 if task == "passkey" else needles,
                    load=load, moba_chunk_size=margs.moba_chunk_size,
                    moba_topk=margs.moba_topk, trained_seq_length=flags.seq_length)
        mine = [dict(info, **r) for r in mine]
        rows += mine
        if first:
            png = plot_heatmap(mine, os.path.join(out, f"needle_{safe_name(label)}.png"))
            print(f"wrote {png}")
        del model
    if not first:
        return rows
    print(format_table(rows))
    for path in write_table(rows, out):
        print(f"wrote {path}")
    return rows
