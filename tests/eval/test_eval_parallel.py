"""Evaluation in memory linear in the tokens, under tensor and context parallelism
(megatron_moba.eval.stream; tools/eval_positional_loss.py and tools/eval_needle.py): greedy decoding by
verifying a guess is greedy decoding; CP 2 and TP 2 give one process's answers (the tool under
torchrun); a model imported from HF without a tokenizer evaluates, scored as transformers scores it."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import megatron_cases as mc
from megatron_moba.eval import needle
from megatron_moba.training.parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
SEQ, WIDTH, TRAIL = 64, 16, 8                     # TINY's --seq-length (moba chunk 16, top-k 2)
LENGTHS = [90, 17, 33, 64, 20, 65, 49, 70]        # token counts of the documents (odd ones: padded under CP)


def _causal_model(vocab, calls):
    """A deterministic causal "model": the logits after position t depend on tokens 0..t only
    (tokens [b, n] -> [b, n, vocab], or the last ``last`` positions)."""
    def logits(tokens, last=None):
        calls.append(tokens.shape)
        mix = torch.cumsum(tokens * 7 + 3, dim=1) % vocab                          # [b, n]
        out = torch.nn.functional.one_hot((mix * 5 + tokens) % vocab, vocab).float()
        return out if last is None else out[:, -last:]
    return logits


def test_verified_greedy_decoding_is_greedy_decoding():
    """The decoding that verifies a guess in one forward gives what re-running the whole sequence per
    token gives, for right, partly right and wrong guesses; a right guess costs one forward."""
    vocab, steps, calls = 11, 5, []
    model = _causal_model(vocab, calls)
    stepwise = _causal_model(vocab, [])       # without ``last_positions``: decoded token by token
    prompts = torch.randint(0, vocab, (6, 20), generator=torch.Generator().manual_seed(0))
    model.last_positions = True
    truth = needle.greedy_decode(lambda t: stepwise(t), prompts, steps)                # [6, steps]
    assert not torch.equal(truth, torch.zeros_like(truth))
    calls.clear()
    assert torch.equal(needle.greedy_decode(model, prompts, steps, truth), truth)
    assert len(calls) == 1 and calls[0] == (6, 20 + steps - 1)                       # one forward, no re-prefill
    for wrong_from in (0, 2, 4):
        guess = truth.clone()
        guess[::2, wrong_from:] = (guess[::2, wrong_from:] + 1) % vocab             # half the rows guessed wrong
        calls.clear()
        assert torch.equal(needle.greedy_decode(model, prompts, steps, guess), truth)
        assert 1 <= len(calls) <= steps - wrong_from                                # the last token is never fed
        assert all(shape[0] <= 3 for shape in calls[1:])                           # only unfinished rows re-run
    assert torch.equal(needle.greedy_decode(model, prompts, steps), truth)            # no guess at all


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_moba.training.preprocess import build_indexed_dataset
    d = tmp_path_factory.mktemp("parallel_eval")
    rng = np.random.default_rng(1)
    texts = [" ".join(map(str, rng.integers(0, 200, n - 1))) for n in LENGTHS]
    build_indexed_dataset(iter(texts), str(d / "docs"), "NullTokenizer", vocab_size=200, progress=False)
    mc.run_distributed(mc.run_pretrain, mc.TINY + ["--save", str(d / "ckpt")])
    return d


def _stream_and_whole(ckpt, tp, cp):
    """streamed_token_losses in pieces of 10 tokens and logits_at on 3 sequences of 61 tokens (odd: padded
    under CP), and in one process the same from the model's whole logits (``token_losses``)."""
    from megatron_moba.eval.checkpoint import load_for_eval, token_losses
    from megatron_moba.eval.stream import logits_at, streamed_token_losses
    model, _, tok = load_for_eval(ckpt, tensor_model_parallel_size=tp, context_parallel_size=cp)
    tokens = torch.randint(0, 200, (3, 62), generator=torch.Generator().manual_seed(3))
    out = dict(streamed=streamed_token_losses(model, tokens, piece_tokens=10),
               at=logits_at(model, tokens[:, :-1], [0, 17, 59, 60], tok.vocab_size))
    if tp == cp == 1:
        with torch.no_grad():
            whole = model(tokens[:, :-1], torch.arange(61)[None], attention_mask=None)[..., :tok.vocab_size]
        out.update(whole=token_losses(model, tokens), whole_at=whole[:, [0, 17, 59, 60]].float())
    return out


def _everything(ckpt, prefix, out, tp, cp):
    """The stream functions, the positional loss library and the needle tool's run at one layout."""
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    return dict(stream=_stream_and_whole(ckpt, tp, cp),
                positional=evaluate_checkpoint(ckpt, read_documents(prefix, SEQ + 1), WIDTH, TRAIL, micro_batch_size=3,
                                               tensor_model_parallel_size=tp, context_parallel_size=cp),
                needle=needle.run([ckpt], [96], out, labels=["tiny"], depths=[0.0, 0.5], trials=3, progress=False,
                                  tensor_model_parallel_size=tp, context_parallel_size=cp))


@pytest.fixture(scope="module")
def layouts(trained):
    """Every rank's results at one process, TP 2 and CP 2 (TP x CP processes each)."""
    ckpt, docs = str(trained / "ckpt"), str(trained / "docs")
    return {(tp, cp): mc.run_distributed(_everything, ckpt, docs, str(trained / f"needle_tp{tp}_cp{cp}"), tp, cp,
                                         tp=tp, cp=cp) for tp, cp in ((1, 1), (2, 1), (1, 2))}


def test_streamed_losses_and_logits_are_the_whole_logits(layouts):
    one = layouts[1, 1][0]["stream"]
    torch.testing.assert_close(one["streamed"], one["whole"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one["at"], one["whole_at"], rtol=1e-5, atol=1e-6)
    for rank in layouts[2, 1] + layouts[1, 2]:                  # TP 2 (vocab-parallel), CP 2: every rank
        torch.testing.assert_close(rank["stream"]["streamed"], one["whole"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["stream"]["at"], one["whole_at"], rtol=1e-5, atol=1e-6)


def _close(a, b):
    return abs(a - b) <= 1e-5 * abs(b)


def test_positional_loss_under_cp2_and_tp2_is_one_process(trained, layouts, tmp_path):
    """The library at TP 2 and CP 2, and the tool under torchrun at CP 2, against one process (whose losses
    test_positional_loss.py checks against the model's whole logits)."""
    ckpt, docs = str(trained / "ckpt"), str(trained / "docs")
    one = layouts[1, 1][0]["positional"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           os.path.join(ROOT, "tools", "eval_positional_loss.py"), "--load", ckpt, "--data-path", docs,
           "--bucket-width", str(WIDTH), "--trailing-tokens", str(TRAIL), "--micro-batch-size", "3",
           "--context-parallel-size", "2", "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 2                                       # rank 0 writes, once
    tool = json.load(open(tmp_path / "out" / "positional_loss.json"))[0]
    for other in [r["positional"] for r in layouts[2, 1] + layouts[1, 2]] + [tool]:
        assert [b["tokens"] for b in other["buckets"]] == [b["tokens"] for b in one["buckets"]]
        assert all(_close(b["loss"], a["loss"]) for a, b in zip(one["buckets"], other["buckets"]))
        assert _close(other["overall_loss"], one["overall_loss"])
        assert _close(other["trailing_loss"], one["trailing_loss"])
        for a, b in zip(one["per_document"]["bucket_sums"], other["per_document"]["bucket_sums"]):
            assert all(_close(y, x) for x, y in zip(a, b) if x)
    rows = list(csv.DictReader(open(tmp_path / "out" / "positional_loss.csv")))
    assert [r["bucket"] for r in rows] == ["0-16", "16-32", "32-48", "48-64", "all", f"last {TRAIL}"]


def test_needle_under_cp2_and_tp2_is_one_process(trained, layouts):
    one = layouts[1, 1][0]["needle"]
    for tp, cp in ((2, 1), (1, 2)):
        for rank in layouts[tp, cp]:                             # every rank: one process's greedy outputs
            assert [r["predictions"] for r in rank["needle"]] == [r["predictions"] for r in one]
            assert [r["accuracy"] for r in rank["needle"]] == [r["accuracy"] for r in one]
        written = json.load(open(trained / f"needle_tp{tp}_cp{cp}" / "needle.json"))    # by rank 0
        assert written == json.loads(json.dumps(one))


def test_parallel_flags_must_match_the_processes(trained, capsys, monkeypatch):
    from helpers import tool_exit_code
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ckpt, docs = str(trained / "ckpt"), str(trained / "docs")
    assert tool_exit_code(monkeypatch, "eval_positional_loss.py", "--load", ckpt, "--data-path", docs,
                          "--bucket-width", "16", "--context-parallel-size", "2") == 2
    assert ("--tensor-model-parallel-size 1 x --context-parallel-size 2 needs 2 processes, but 1 was started: run "
            "the tool under torchrun --nproc-per-node 2") in capsys.readouterr().err
    assert tool_exit_code(monkeypatch, "eval_needle.py", "--load", ckpt, "--lengths", "64", "--out", "x",
                          "--tensor-model-parallel-size", "0") == 2
    assert "--tensor-model-parallel-size must be >= 1, got 0" in capsys.readouterr().err


def _import_and_evaluate(hf_dir, ckpt, prefix, out, tokenizer_dir):
    from megatron_moba.eval.checkpoint import eval_tokenizer, saved_args
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    from megatron_moba.hf.convert import import_to_checkpoint
    import_to_checkpoint(hf_dir, ckpt)
    loss = evaluate_checkpoint(ckpt, read_documents(prefix, SEQ + 1), WIDTH, TRAIL, micro_batch_size=2)
    rows = needle.run([ckpt], [40], out, depths=[0.0, 0.5], trials=2, progress=False)
    text = needle.run([ckpt], [60], out + "_text", depths=[0.5], trials=1, progress=False,   # --tokenizer-type ...
                      tokenizer=dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir))
    narrow = saved_args(ckpt)
    narrow.vocab_size = 2                             # eos_token_id 2 outside it: refused, naming the flags
    with pytest.raises(ValueError, match="names no eos_token_id inside its 2-token vocabulary .got 2.: pass the "
                       r"model's tokenizer \(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR\)"):
        eval_tokenizer(narrow, ckpt)
    return loss, rows, text


def test_hf_import_without_a_tokenizer_evaluates_as_transformers_does(tmp_path):
    """An HF model of 384 rows (a multiple of 128: NullTokenizer's end-of-document row would make 385, padded
    to 512) imported without a tokenizer: both tools load it, text is token ids, the end-of-document id is
    config.json's eos_token_id; losses and greedy answers are transformers' (MoBA's chunk 512 covers the
    64 tokens: full attention)."""
    transformers = pytest.importorskip("transformers")
    from megatron_moba.training.preprocess import build_indexed_dataset
    from megatron_moba.training.tokenizer import Tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, 383, n - 1) for n in (65, 40, 70)]         # + EOD 383 (NullTokenizer of 383 ids)
    build_indexed_dataset(iter(" ".join(map(str, d)) for d in docs), str(tmp_path / "docs"), "NullTokenizer",
                          vocab_size=383, progress=False)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([" ".join(needle.FILLER) + needle.NEEDLE + needle.QUESTION + " 0123456789"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(tmp_path / "tok")
    bpe.save(str(tmp_path / "tok" / "tokenizer.json"))
    loss, rows, text = mc.run_distributed(_import_and_evaluate, str(tmp_path / "hf"), str(tmp_path / "mg"),
                                          str(tmp_path / "docs"), str(tmp_path / "needle"), str(tmp_path / "tok"))[0]
    with torch.no_grad():
        per_token = []
        for d in docs:
            ids = torch.tensor([*d, 383][:SEQ + 1])[None]
            logits = hf(ids[:, :-1]).logits[0]
            per_token += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()
    assert loss["overall_tokens"] == len(per_token) == 64 + 39 + 64
    assert _close(loss["overall_loss"], sum(per_token) / len(per_token))
    builder = needle.PromptBuilder(Tokenizer("NullTokenizer", 384, 2, lambda t: [int(x) for x in t.split()],
                                             lambda ids: " ".join(map(str, ids))))
    for r in rows:
        for key, prediction in zip(r["passkeys"], r["predictions"]):
            p = builder.build(40, r["depth"], key)
            ids = torch.tensor([p.tokens])
            greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(p.answer),
                                 do_sample=False, pad_token_id=0)[0, len(p.tokens):]
            assert prediction == " ".join(map(str, greedy.tolist()))
    from megatron_moba.training.tokenizer import build_tokenizer
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tok"))       # the --tokenizer-model override
    builder = needle.PromptBuilder(tok)
    for key, prediction in zip(text[0]["passkeys"], text[0]["predictions"]):
        p = builder.build(60, 0.5, key)
        ids = torch.tensor([p.tokens])
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(p.answer),
                             do_sample=False, pad_token_id=0)[0, len(p.tokens):]
        assert prediction == tok.detokenize(greedy.tolist())
