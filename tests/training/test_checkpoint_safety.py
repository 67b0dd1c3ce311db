"""Checkpoint safety: no silent overwrite of saved runs, clear load errors, resume reports,
metrics without duplicates, and the HF import -> continued pretraining -> export chain."""
import json
import os
import subprocess
import sys

import pytest
import torch

import megatron_cases as mc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def _run(argv, **layout):
    return mc.run_distributed(mc.run_pretrain, argv, **layout)


def _error(argv, kind):
    return mc.run_distributed(mc.run_pretrain_error, argv, kind)[0]


def _iters(argv, n):
    argv = list(argv)
    argv[argv.index("--train-iters") + 1] = str(n)
    return argv


class _Crash(Exception):
    pass


def crash_at(argv, iteration):
    """The job, killed (no save) when it is about to run the step after ``iteration``."""
    from megatron_moba.training.trainer import Trainer
    real = Trainer.train_step

    def step(self):
        if self.iteration >= iteration:
            raise _Crash()
        return real(self)
    Trainer.train_step = step
    try:
        mc.run_pretrain(argv)
        return "no crash"
    except _Crash:
        return "crashed"
    finally:
        Trainer.train_step = real


def _copy(saved_run, tmp_path):
    import shutil
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved_run, ckpt)
    return ckpt


def _tree(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(path) for f in files)


# ---------------------------------------------------------------- no silent overwrite
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run saved at iterations 2 and 4 (of 6)."""
    ckpt = str(tmp_path_factory.mktemp("run") / "ckpt")
    _run(mc.TINY + ["--save", ckpt, "--save-interval", "2", "--exit-interval", "4"])
    return ckpt


def test_missing_tracker_refuses_to_start_from_scratch(saved_run, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    os.remove(os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
    before = _tree(ckpt)
    msg = _error(mc.TINY + ["--load", ckpt, "--save", ckpt], "FileNotFoundError")
    assert "refusing to start from scratch" in msg and os.path.join(ckpt, "iter_0000004") in msg, msg
    assert f"echo 4 > {os.path.join(ckpt, 'latest_checkpointed_iteration.txt')}" in msg and "--ckpt-step 4" in msg
    assert _tree(ckpt) == before                                     # nothing overwritten
    # --load alone names the same way out
    msg = _error(mc.TINY + ["--load", ckpt], "FileNotFoundError")
    assert "iter_0000004" in msg and "--ckpt-step 4" in msg, msg
    # and the way out works: an explicit iteration resumes (2 steps left of 6)
    assert len(_run(mc.TINY + ["--load", ckpt, "--save", ckpt, "--ckpt-step", "4"])[0]) == 2


def test_save_into_a_directory_with_checkpoints_is_refused(tmp_path):
    from megatron_moba.training.checkpointing import check_save_dir
    run, other, imported = tmp_path / "run", str(tmp_path / "other"), tmp_path / "imported"
    (run / "iter_0000004").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    (imported / "iter_0000000").mkdir(parents=True)
    (imported / "latest_checkpointed_iteration.txt").write_text("0")
    run, imported = str(run), str(imported)
    with pytest.raises(FileExistsError, match=f"--save {run} already holds checkpoints .*no --load.*--load {run}"):
        check_save_dir(run)                                          # --save D without --load
    with pytest.raises(FileExistsError, match=f"another run than --load {other}"):
        check_save_dir(run, other)                                   # resume elsewhere into D
    with pytest.raises(FileExistsError, match="--finetune restarts at iteration 0 and would overwrite"):
        check_save_dir(run, run, finetune=True)
    assert check_save_dir(run, run) is False                         # a resume
    assert check_save_dir(imported, imported, finetune=True) is False  # training next to an import
    assert check_save_dir(str(tmp_path / "new"), str(tmp_path / "new")) is True   # first start
    assert check_save_dir(str(tmp_path / "new")) is False
    (tmp_path / "tmp_only" / "iter_0000002.tmp").mkdir(parents=True)  # a crashed save is no checkpoint
    assert check_save_dir(str(tmp_path / "tmp_only")) is False


def test_fresh_run_into_used_save_dir_is_refused_by_the_job(saved_run, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    before = _tree(ckpt)
    msg = _error(mc.TINY + ["--save", ckpt], "FileExistsError")
    assert f"--save {ckpt} already holds checkpoints" in msg and "iter_0000004" in msg, msg
    assert _tree(ckpt) == before


# ---------------------------------------------------------------- load errors and resume reports
def test_corrupt_shard_names_the_file(saved_run, tmp_path):
    import glob
    ckpt = _copy(saved_run, tmp_path)
    shard = max(glob.glob(os.path.join(ckpt, "iter_0000004", "*.distcp")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    msg = _error(mc.TINY + ["--load", ckpt], "RuntimeError")
    assert f"could not load checkpoint {os.path.join(ckpt, 'iter_0000004')}" in msg, msg
    assert shard in msg and "truncated" in msg, msg
    assert "--ckpt-step 2" in msg, msg                             # the earlier checkpoint is offered


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def test_resume_reports_ignored_flags_and_override_takes_the_command_line(saved_run, tmp_path, capfd):
    capfd.readouterr()
    m_default, m_override = str(tmp_path / "default.jsonl"), str(tmp_path / "override.jsonl")
    changed = _iters(mc.TINY, 8) + ["--lr", "1e-3", "--load", saved_run, "--metrics-file"]
    assert len(_run(changed + [m_default])[0]) == 4
    out = capfd.readouterr().out
    assert "the checkpoint's LR/WD schedule is used" in out and "--override-opt_param-scheduler" in out, out
    assert "--lr: checkpoint 0.003, command line 0.001 (ignored)" in out, out
    assert "--lr-decay-iters (default: --train-iters): checkpoint 6, command line 8 (ignored)" in out, out
    _run(changed + [m_override, "--override-opt_param-scheduler"])
    out = capfd.readouterr().out
    assert "the LR/WD schedule follows the command line" in out, out
    default = {m["iteration"]: m["lr"] for m in _metrics(m_default) if "lr" in m}
    override = {m["iteration"]: m["lr"] for m in _metrics(m_override) if "lr" in m}
    import math

    def cosine(max_lr, it, warmup, decay):         # megatron's schedule after `it` steps
        return max_lr * 0.5 * (math.cos(math.pi * (it - warmup) / (decay - warmup)) + 1)
    for it in (5, 6):                              # the checkpoint's 3e-3 over 6 vs the command line's 1e-3 over 8
        assert abs(default[it] - cosine(3e-3, it, 1, 6)) < 1e-9 and abs(override[it] - cosine(1e-3, it, 1, 8)) < 1e-9
    with pytest.raises(SystemExit):
        from megatron_moba.training.arguments import parse_args
        parse_args(mc.TINY + ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], world_size=1)
    assert "not allowed with argument" in capfd.readouterr().err
    _run(changed + [m_default, "--use-checkpoint-opt_param-scheduler"])      # Megatron's flag is accepted


def test_resuming_a_finished_run_says_so_and_exits_0(saved_run, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    before = _tree(ckpt)
    r = subprocess.run([sys.executable, "-m", "megatron_moba.pretrain", *_iters(mc.TINY, 4), "--load", ckpt,
                        "--save", ckpt], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{ckpt} is at iteration 4, and --train-iters is 4: the run is complete, nothing to train" in r.stdout
    assert "iteration      " not in r.stdout
    assert _tree(ckpt) == before


def test_metrics_have_no_duplicates_after_a_crash_resume(tmp_path):
    ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")
    argv = mc.TINY + ["--save", ckpt, "--save-interval", "2", "--metrics-file", metrics]
    assert mc.run_distributed(crash_at, argv, 3)[0] == "crashed"    # saved at 2, logged 3, then died
    with open(metrics, "a") as f:
        f.write('{"iteration": 4, "lo')                              # and a line torn by the crash
    from megatron_moba.training.checkpointing import read_latest
    assert read_latest(ckpt) == 2
    assert [json.loads(line)["iteration"] for line in list(open(metrics))[:-1]] == [1, 2, 3]
    assert len(_run(argv + ["--load", ckpt])[0]) == 4
    its = [m["iteration"] for m in _metrics(metrics)]
    assert its == [1, 2, 3, 4, 5, 6], its


# ---------------------------------------------------------------- Hugging Face chain
transformers = pytest.importorskip("transformers")


def _tool(*args, ok=True):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_checkpoint.py"), *args],
                       capture_output=True, text=True, env=ENV)
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d / "hf"))
    return d


def test_import_refuses_a_non_empty_directory(saved_run, hf_dir, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    before = _tree(ckpt)
    out = _tool("import", "--hf-dir", str(hf_dir / "hf"), "--save", ckpt, ok=False)
    assert f"--save {ckpt} is not empty" in out, out
    assert _tree(ckpt) == before
    from megatron_moba.hf.convert import import_to_checkpoint
    with pytest.raises(FileExistsError, match="is not an empty directory"):
        import_to_checkpoint(str(hf_dir / "hf"), ckpt)


def megatron_logits(load_dir, tokens):
    from megatron_moba.eval.checkpoint import load_for_eval
    model, _, _ = load_for_eval(load_dir, attention="full")
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None], attention_mask=None)


def test_import_continued_pretraining_export_chain(hf_dir):
    from safetensors.torch import load_file
    d = hf_dir
    printed = _tool("import", "--hf-dir", str(d / "hf"), "--save", str(d / "mg"))
    flags = printed.split("--finetune ")[1].splitlines()[0].split()
    job = [a for a in mc.TINY if a not in ("--disable-bias-linear", "--untie-embeddings-and-output-weights")]
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups", "--normalization"):
        i = job.index(flag)
        del job[i:i + 2]
    flags[flags.index("--rotary-base") + 1] = "20000"                # continued pretraining changes RoPE's base
    stage1 = job + flags + ["--train-iters", "3", "--load", str(d / "mg"), "--finetune", "--save", str(d / "run1")]
    assert len(_run(stage1)[0]) == 3
    stage2 = job + flags + ["--train-iters", "2", "--load", str(d / "run1"), "--finetune", "--save", str(d / "run2")]
    assert len(_run(stage2)[0]) == 2                                 # a second stage keeps it too
    _tool("export", "--load", str(d / "run2"), "--out", str(d / "out"))
    exported = transformers.LlamaForCausalLM.from_pretrained(str(d / "out")).eval()
    rope = getattr(exported.config, "rope_parameters", None) or {"rope_theta": exported.config.rope_theta}
    assert rope["rope_theta"] == 20000.0 and exported.config.moba_chunk_size == 16
    trained, original = load_file(str(d / "out" / "model.safetensors")), load_file(str(d / "hf" / "model.safetensors"))
    assert any(not torch.equal(trained[k], original[k]) for k in original)          # the trained weights
    tokens = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = exported(tokens).logits
    mg = mc.run_distributed(megatron_logits, str(d / "run2"), tokens)[0]
    assert (mg[..., :200] - hf).abs().max().item() < 1e-4


def test_export_without_a_carried_config_needs_hf_config(hf_dir, tmp_path):
    from megatron_moba.hf.convert import megatron_args, read_hf_config
    d = hf_dir
    job = [a for a in mc.TINY if a not in ("--disable-bias-linear", "--untie-embeddings-and-output-weights")]
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups", "--normalization"):
        i = job.index(flag)
        del job[i:i + 2]
    ckpt = str(tmp_path / "scratch")                                  # Llama flags, trained from scratch
    _run(job + megatron_args(read_hf_config(str(d / "hf"))) + ["--train-iters", "2", "--save", ckpt])
    out = _tool("export", "--load", ckpt, "--out", str(tmp_path / "a"), ok=False)
    assert "has no stored HF config" in out and "--hf-config" in out, out
    _tool("export", "--load", ckpt, "--out", str(tmp_path / "b"), "--hf-config", str(d / "hf" / "config.json"))
    exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    tokens = torch.randint(0, 200, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf = exported(tokens).logits
    mg = mc.run_distributed(megatron_logits, ckpt, tokens)[0]
    assert (mg[..., :200] - hf).abs().max().item() < 1e-4
    wrong = json.load(open(d / "hf" / "config.json")) | {"num_hidden_layers": 3}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    out = _tool("export", "--load", ckpt, "--out", str(tmp_path / "c"), "--hf-config", str(tmp_path / "wrong.json"),
                ok=False)
    assert "does not have the architecture of the HF config" in out and "num_layers: checkpoint 2" in out, out
