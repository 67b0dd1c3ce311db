"""Passkey retrieval (megatron_moba.eval.needle, tools/eval_needle.py): the prompt holds the passkey at the asked
depth for SentencePiece, HF and NullTokenizer; greedy scoring against oracle, adversarial and copying
"models"; an end-to-end run on tiny MoBA and full-attention checkpoints; clear errors."""
import csv
import json
import os
import random
import re
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import megatron_cases as mc
from helpers import tool_exit_code
from megatron_moba.eval import needle
from megatron_moba.training.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

DEPTHS = [0.0, 0.25, 0.5, 0.8, 1.0]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One tokenizer of each kind: SentencePiece and byte-level BPE (HF) trained here on a small text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_moba.training.preprocess import train_sentencepiece
    d = tmp_path_factory.mktemp("tokenizers")
    rng = random.Random(0)
    texts = ["".join(needle.FILLER) * 2 + needle.NEEDLE.format(key=rng.randint(10000, 99999)) + needle.QUESTION
             + " Numbers 0123456789 and other words." for _ in range(40)]
    spm = train_sentencepiece(iter(texts), str(d / "spm"), 300)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(d / "tokenizer.json"))
    return {"null": build_tokenizer("NullTokenizer", vocab_size=200),
            "sentencepiece": build_tokenizer("SentencePieceTokenizer", spm),
            "hf": build_tokenizer("HuggingFaceTokenizer", str(d / "tokenizer.json"))}


@pytest.mark.parametrize("kind", ["null", "sentencepiece", "hf"])
def test_prompt_holds_the_passkey_at_the_depth(tokenizers, kind):
    tok = tokenizers[kind]
    builder = needle.PromptBuilder(tok)
    longest_sentence = max(len(s) for s in builder.sentences)
    for length in (300, 1000):
        for depth in DEPTHS:
            for key in ("48213", "90517"):
                p = builder.build(length, depth, key)
                assert len(p.tokens) + len(p.answer) == length
                if kind == "null":       # the integer task, checked id by id
                    digits = [int(c) for c in key]
                    assert p.answer == digits and p.tokens[-2:] == [needle.QUERY, needle.KEY]
                    keys = [i for i, t in enumerate(p.tokens) if t == needle.KEY]
                    start = keys[0]
                    assert keys == [start, len(p.tokens) - 1]          # one needle, then the question
                    assert p.tokens[start:start + len(digits) + 2] == [needle.KEY, *digits, needle.KEY_END]
                    filler = p.tokens[:start] + p.tokens[start + len(digits) + 2:-2]
                    assert all(t >= needle.FIRST_FILLER for t in filler)
                    assert abs(start - depth * len(filler)) <= 0.5      # exact depth for integer prompts
                else:                     # text: find the needle in the decoded prompt
                    text = tok.detokenize(p.tokens)
                    sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
                    assert text.count(sentence) == 1 and text.count(key) == 2
                    assert text.rstrip().endswith("What is the pass key? The pass key is")
                    assert tok.detokenize(p.answer).strip() == key
                    assert sentence in tok.detokenize(p.tokens[p.needle_start:p.needle_start + p.needle_len])
                    before = p.needle_start
                    filler = len(p.tokens) - p.needle_len - len(builder.pieces(key)[1])
                    assert abs(before - depth * filler) <= longest_sentence / 2 + 1
                    # the needle sits between whole filler sentences (or at the very start / end)
                    assert before == 0 or text[:text.index(sentence)].rstrip().endswith(".")


def _oracle(prompts, vocab, wrong_at=None, wrong_keys=None):
    """A "model" that knows every prompt's answer: all logit mass on the answer's next token (whatever
    it generated before), or on a wrong one at answer step ``wrong_at`` (for the passkeys in
    ``wrong_keys``, default all).
    tokens [b, n] -> logits [b, n, vocab]."""
    by_prompt = {tuple(p.tokens): p for p in prompts}
    sizes = sorted({len(p.tokens) for p in prompts})

    def logits(tokens):
        out = torch.zeros(*tokens.shape, vocab)
        n = tokens.shape[1]
        for i, row in enumerate(tokens.tolist()):
            p = next(by_prompt[key] for key in (tuple(row[:m]) for m in sizes if m <= n) if key in by_prompt)
            wrong = n - len(p.tokens) == wrong_at and (wrong_keys is None or p.passkey in wrong_keys)
            out[i, -1, ((p.tokens + p.answer)[n] + int(wrong)) % vocab] = 1.0
        return out
    return logits


@pytest.mark.parametrize("kind", ["null", "sentencepiece", "hf"])
def test_scorer_oracle_adversarial_and_mixed(tokenizers, kind):
    tok = tokenizers[kind]
    builder = needle.PromptBuilder(tok)
    keys = needle.make_passkeys(6, 5, seed=1)
    prompts = [builder.build(n, d, k) for n in (200, 400) for d in (0.0, 0.5, 1.0) for k in keys]
    last = min(len(p.answer) for p in prompts) - 1
    # right throughout / wrong at the first answer token / wrong at the last / wrong for half of the passkeys
    for wrong_at, wrong_keys, expected in ((None, None, 1.0), (0, None, 0.0), (last, None, 0.0),
                                           (last, set(keys[::2]), 0.5)):
        rows = needle.evaluate(_oracle(prompts, tok.vocab_size, wrong_at, wrong_keys), builder, [200, 400],
                               [0.0, 0.5, 1.0], keys, batch_size=4)
        assert [r["accuracy"] for r in rows] == [expected] * 6
        assert all(r["trials"] == 6 and r["correct"] == 6 * expected for r in rows)
    rows = needle.evaluate(_oracle(prompts, tok.vocab_size), builder, [400], [0.5], keys)
    assert [p.strip() for p in rows[0]["predictions"]] == [tok.detokenize(builder.pieces(k)[2]).strip() for k in keys]


def test_integer_prompt_is_solved_by_copying_after_the_key():
    """The NullTokenizer task needs retrieval only: a "model" that copies what followed the first KEY
    (knowing nothing of the answers) scores 1.0 at every length and depth; one copying from the wrong
    place scores 0."""
    tok = build_tokenizer("NullTokenizer", vocab_size=50)
    builder = needle.PromptBuilder(tok)

    def copier(offset):
        def logits(tokens):                       # [b, n] -> [b, n, V]
            out = torch.zeros(*tokens.shape, tok.vocab_size)
            for i, row in enumerate(tokens.tolist()):
                first, last = row.index(needle.KEY), len(row) - 1 - row[::-1].index(needle.KEY)
                out[i, -1, row[first + 1 + offset + (len(row) - 1 - last)]] = 1.0
            return out
        return logits
    keys = needle.make_passkeys(5, 6, seed=3)
    assert {r["accuracy"] for r in needle.evaluate(copier(0), builder, [64, 300], DEPTHS, keys)} == {1.0}
    assert {r["accuracy"] for r in needle.evaluate(copier(1), builder, [64, 300], DEPTHS, keys)} == {0.0}


def test_lengths_checks_name_the_flag(tokenizers):
    rope = Namespace(seq_length=64, position_embedding_type="rope")
    learned = Namespace(seq_length=64, position_embedding_type="learned_absolute")
    assert needle.check_lengths(rope, [32, 64]) is None and needle.check_lengths(rope, [32, 256]) == 256
    assert needle.check_lengths(learned, [64]) is None
    with pytest.raises(ValueError, match="--lengths 128 exceeds the checkpoint's --seq-length 64.*learned_absolute"):
        needle.check_lengths(learned, [32, 128])
    with pytest.raises(ValueError, match="--lengths must be positive"):
        needle.check_lengths(rope, [0])
    with pytest.raises(ValueError, match="--lengths 10 is too short"):
        needle.PromptBuilder(tokenizers["sentencepiece"]).build(10, 0.5, "12345")
    with pytest.raises(ValueError, match="NullTokenizer vocabulary .* too small"):
        needle.PromptBuilder(build_tokenizer("NullTokenizer", vocab_size=12))


def test_cli_errors(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nothing")
    cases = [(["--load", missing, "--lengths", "64"], f"--load {missing}: checkpoint directory"),
             (["--load", missing, "--labels", "a", "b", "--lengths", "64"], "--labels has 2 names for 1 --load"),
             (["--load", missing, "--lengths", "64", "--depths", "1.5"], "--depths must be fractions in [0, 1]"),
             (["--load", missing, "--lengths", "64", "--trials", "0"], "--trials must be >= 1")]
    for argv, text in cases:
        assert tool_exit_code(monkeypatch, "eval_needle.py", *argv, "--out", str(tmp_path / "o")) == 2, argv
        assert text in capsys.readouterr().err


def _train_and_decode_by_hand(argv, length, depth, keys):
    """Train a checkpoint; then decode each prompt alone, one token at a time through the loaded model
    (the tool's batched decoding must agree)."""
    from megatron_moba.eval.checkpoint import load_for_eval
    mc.run_pretrain(argv)
    model, args, tok = load_for_eval(argv[argv.index("--save") + 1], seq_length=length)
    builder, out = needle.PromptBuilder(tok), []
    with torch.no_grad():
        for key in keys:
            p = builder.build(length, depth, key)
            seq = list(p.tokens)
            for _ in p.answer:
                logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], attention_mask=None)
                seq.append(int(logits[0, -1, :tok.vocab_size].argmax()))
            out.append(tok.detokenize(seq[len(p.tokens):]))
    return out


def test_end_to_end_on_tiny_checkpoints(tmp_path):
    ckpts = {"moba": str(tmp_path / "moba"), "full": str(tmp_path / "full")}
    keys = needle.make_passkeys(3, 5, seed=0)                 # the tool's passkeys for --trials 3
    by_hand = mc.run_distributed(_train_and_decode_by_hand, mc.TINY + ["--save", ckpts["moba"]], 96, 0.5, keys)[0]
    full = ["--save", ckpts["full"], "--attention", "full", "--train-iters", "2"]
    mc.run_distributed(mc.run_pretrain, mc.TINY + full)
    out = tmp_path / "needle"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_needle.py"), "--load", ckpts["moba"], ckpts["full"],
           "--labels", "tiny moba", "tiny-full", "--lengths", "48", "96", "--depths", "0", "0.5", "1",
           "--trials", "3", "--out", str(out), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tiny moba (moba), accuracy over 3 trials" in run.stdout and "tiny-full (full)" in run.stdout
    rows = list(csv.DictReader(open(out / "needle.csv")))
    assert list(rows[0]) == ["label", "variant", "length", "depth", "accuracy", "trials"]
    assert [(r["label"], r["variant"], int(r["length"]), float(r["depth"])) for r in rows] == [
        (label, variant, n, d) for label, variant in (("tiny moba", "moba"), ("tiny-full", "full"))
        for n in (48, 96) for d in (0.0, 0.5, 1.0)]
    detail = json.load(open(out / "needle.json"))
    for r, row in zip(detail, rows):
        assert r["passkeys"] == keys and int(row["trials"]) == 3
        assert r["accuracy"] == float(row["accuracy"]) == r["correct"] / 3
        assert r["accuracy"] == sum(p == " ".join(k) for p, k in zip(r["predictions"], keys)) / 3
    for name in ("needle_tiny_moba.png", "needle_tiny-full.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
    # the tool's greedy outputs are the model's, beyond the training length (64; RoPE) too
    cell = next(r for r in detail if r["label"] == "tiny moba" and r["length"] == 96 and r["depth"] == 0.5)
    assert cell["predictions"] == by_hand



@pytest.mark.parametrize("task", ["multikey", "multivalue"])
@pytest.mark.parametrize("kind", ["null", "sentencepiece", "hf"])
def test_ruler_variants_hide_every_needle_and_ask_the_right_one(tokenizers, kind, task):
    """multikey: 4 needles of distinct names, the asked one (the trial's passkey) at the depth, its value the
    answer; multivalue: 4 values of one name, all of them the answer in the order they appear."""
    tok = tokenizers[kind]
    builder = needle.PromptBuilder(tok, task, needles=4)
    for length in (400, 1000):
        for depth in DEPTHS:
            for key in ("48213", "90517"):
                p = builder.build(length, depth, key)
                assert len(p.tokens) + len(p.answer) == length and p.passkey == key
                if kind == "null":
                    starts = [i for i, t in enumerate(p.tokens) if t == needle.KEY][:-1]      # the last: question
                    assert len(starts) == 4 and p.tokens[-5:-3] == [needle.QUERY, needle.KEY]
                    found = [(tuple(p.tokens[i + 1:i + 3]), p.tokens[i + 4:i + 9]) for i in starts]
                    assert all(p.tokens[i + 3] == p.tokens[i + 9] == needle.KEY_END for i in starts)
                    asked = tuple(p.tokens[-3:-1])
                    assert p.tokens[p.needle_start + 4:p.needle_start + 9] == [int(c) for c in key]
                    values = [v for name, v in found if name == asked]
                    if task == "multikey":
                        assert len({name for name, _ in found}) == 4 and values == [[int(c) for c in key]]
                        assert p.answer == values[0]
                    else:
                        assert len(values) == 4 and [int(c) for c in key] in values
                        assert p.answer == [t for v in values for t in v + [needle.KEY_END]][:-1]
                    filler = len(p.tokens) - 4 * 10 - 5                                # needles of 10 ids
                    before = sum(i < p.needle_start for i in starts)
                    assert abs(p.needle_start - 10 * before - depth * filler) <= 0.5     # exact depth
                else:
                    text = tok.detokenize(p.tokens)
                    shown = tok.detokenize(p.tokens[p.needle_start:p.needle_start + p.needle_len])
                    if task == "multikey":
                        name = re.search(r"What is the pass key of (\w+)\? The pass key of \1 is$", text.rstrip())[1]
                        assert f"The pass key of {name} is {key}. Remember it." in text
                        assert len(set(re.findall(r"The pass key of (\w+) is \d+\. Remember", text))) == 4
                        assert f"of {name} is {key}" in shown and tok.detokenize(p.answer).strip() == key
                    else:
                        name = re.search(r"What are all the pass keys of (\w+)\? The pass keys of \1 are$",
                                         text.rstrip())[1]
                        values = re.findall(f"One of the pass keys of {name} is (\\d+)\\.", text)
                        assert len(values) == 4 and key in values and f"is {key}." in shown
                        assert tok.detokenize(p.answer).strip() == ", ".join(values)
    keys = needle.make_passkeys(4, 5, seed=2)
    prompts = [builder.build(n, d, k) for n in (400, 600) for d in (0.0, 1.0) for k in keys]
    rows = needle.evaluate(_oracle(prompts, tok.vocab_size), builder, [400, 600], [0.0, 1.0], keys, batch_size=3)
    assert [r["accuracy"] for r in rows] == [1.0] * 4
    with pytest.raises(ValueError, match="--needles must be between 2 and 16 for --task multikey, got 1"):
        needle.PromptBuilder(tok, "multikey", needles=1)
