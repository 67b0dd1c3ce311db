"""Launch scripts: syntax, shellcheck, Slurm under a fake allocation, flags the trainer accepts, Docker pins."""
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

from megatron_moba.training.arguments import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")) + glob.glob(os.path.join(ROOT, ".ci", "*.sh"))
                 + [os.path.join(ROOT, ".ci", "run")])


def _dry(script, env=None, path_prefix=None):
    e = dict(os.environ, DRY_RUN="1", **(env or {}))
    if path_prefix:
        e["PATH"] = f"{path_prefix}:{e['PATH']}"
    r = subprocess.run(["bash", os.path.join(ROOT, script)], capture_output=True, text=True, env=e, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def _trainer_flags(words):
    return words[words.index("megatron_moba.pretrain") + 1:]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed (.ci/run installs it from Debian)")
        pytest.skip("shellcheck not installed")
    r = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout


def test_single_node_command_parses_with_the_trainer():
    words = shlex.split(_dry("examples/pretrain_gpt_moba_single_node.sh", {"TP": "2", "CP": "2"})[0])
    assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    args = parse_args(_trainer_flags(words), world_size=8)
    assert (args.tensor_model_parallel_size, args.context_parallel_size, args.data_parallel_size) == (2, 2, 2)
    assert args.sequence_parallel and args.moba_chunk_size == 512 and args.moba_topk == 3 and args.seq_length == 32768


@pytest.fixture
def fake_slurm(tmp_path):
    """scontrol that expands node[1-N]; srun that must not run in DRY_RUN."""
    (tmp_path / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                                        'n=$(echo "$3" | sed -E "s/.*-([0-9]+)]$/\\1/")\n'
                                        'for i in $(seq 1 "$n"); do echo "node$i"; done\n')
    (tmp_path / "srun").write_text("#!/bin/bash\necho srun should not run in DRY_RUN >&2; exit 1\n")
    for f in ("scontrol", "srun"):
        os.chmod(tmp_path / f, 0o755)
    return str(tmp_path)


@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_script_builds_the_rendezvous(fake_slurm, nodes):
    env = {"SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "moba", "TP": "2", "CP": "4"}
    words = shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert words[3:5] == ["bash", "-c"]
    inner = shlex.split(words[5].replace("$SLURM_NODEID", "NODEID"))
    assert inner[:3] == ["torchrun", "--nnodes", str(nodes)]
    assert inner[inner.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert inner[inner.index("--rdzv-id") + 1] == "4242"
    assert inner[-2:] == ["--node-rank", "NODEID"]             # expanded by each node's own shell
    args = parse_args(_trainer_flags(inner[:-2]), world_size=nodes * 8)
    assert args.save == args.load == "runs/moba-4242/checkpoints"
    assert args.data_parallel_size == nodes * 8 // 8


def test_slurm_script_starts_a_stage_from_another_checkpoint(fake_slurm):
    env = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "INIT_FROM": "runs/stage0",
           "SEQ_LENGTH": "131072", "CP": "8", "TP": "2"}
    inner = shlex.split(shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])[5]
                        .replace("$SLURM_NODEID", "0"))
    args = parse_args(_trainer_flags(inner[:-2]), world_size=16)
    assert args.load == "runs/stage0" and args.finetune and args.seq_length == 131072


# Meta-Llama-3.1-8B's config.json as published (transformers 4.43)
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "normalization", "norm_epsilon", "swiglu", "disable_bias_linear", "add_qkv_bias",
                "qk_layernorm", "use_rope_scaling", "rope_scaling_factor", "untie_embeddings_and_output_weights",
                "position_embedding_type", "vocab_size", "tokenizer_type", "tokenizer_model")


def test_continued_pretraining_recipe(tmp_path, fake_slurm):
    """The recipe on Llama 3.1 8B's config: every stage trains the imported model (its flags, from the
    tool: RoPE scaling, tokenizer, vocabulary), with the recipe's RoPE base, context and MoBA."""
    import json
    import sys

    from tokenizers import Tokenizer, models

    from megatron_moba.hf.convert import model_flags, read_hf_config, tokenizer_flags
    hf = tmp_path / "Meta-Llama-3.1-8B"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    Tokenizer(models.WordLevel({"<unk>": 0, "<|end_of_text|>": 1, "a": 2}, unk_token="<unk>")).save(
        str(hf / "tokenizer.json"))
    lines = _dry("examples/continued_pretraining_long_context.sh", {"HF_DIR": str(hf), "PYTHON": sys.executable})
    assert shlex.split(lines[0])[1:5] == ["tools/convert_hf_checkpoint.py", "import", "--hf-dir", str(hf)]
    stages = [shlex.split(x) for x in lines[1:]]
    assert [w for s in stages for w in s if w.startswith("SEQ_LENGTH=")] == ["SEQ_LENGTH=131072", "SEQ_LENGTH=262144"]
    assert "INIT_FROM=runs/long_context/stage0" in stages[0]
    assert "INIT_FROM=runs/long_context/stage1/checkpoints" in stages[1]
    stage_env = dict(w.split("=", 1) for w in stages[0][1:stages[0].index("sbatch")])
    env = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "ROTARY_BASE": "5000000",
           "MOBA_CHUNK": "4096", "MOBA_TOPK": "12", "MOBA_FULL_LAYERS": "3", "TP": "8", **stage_env}
    inner = shlex.split(shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])[5]
                        .replace("$SLURM_NODEID", "0"))
    job = parse_args(_trainer_flags(inner[:-2]), world_size=64)
    cfg = read_hf_config(str(hf))
    imported = parse_args(model_flags(cfg) + tokenizer_flags(str(hf), cfg) + [
        "--seq-length", "64", "--train-iters", "1", "--mock-data"], world_size=1)
    assert {k: getattr(job, k) for k in MODEL_FIELDS} == {k: getattr(imported, k) for k in MODEL_FIELDS}
    assert (job.use_rope_scaling, job.rope_scaling_factor, job.vocab_size) == (True, 8.0, 128256)
    assert (job.tokenizer_type, job.tokenizer_model) == ("HuggingFaceTokenizer", str(hf))
    assert (job.rotary_base, job.seq_length, job.max_position_embeddings) == (5000000, 131072, 131072)
    assert (job.moba_chunk_size, job.moba_topk, job.moba_full_attn_layers) == (4096, 12, 3)
    assert (job.load, job.finetune, job.context_parallel_size) == ("runs/long_context/stage0", True, 8)


def test_tiny_cpu_script_runs_the_demo():
    words = shlex.split(_dry("examples/pretrain_tiny_cpu.sh", {"PYTHON": "python3"})[0])
    assert words == ["python3", "examples/demo_pretrain.py", "--out", "runs/demo", "--train-iters", "200"]


def test_dockerfile_pins_match_constraints():
    docker = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    constraints = open(os.path.join(ROOT, "constraints.txt")).read()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([\w.+]+)$", constraints, re.M))
    docker_pins = re.findall(r"([a-z-]+)==([\d.]+)", docker)
    assert {"megatron-core", "sentencepiece", "datasets"} <= {name for name, _ in docker_pins}
    for name, version in docker_pins:
        assert pins.get(name) == version, f"docker pins {name}=={version}, constraints.txt {pins.get(name)}"
    assert "--no-deps" in docker                       # keeps the container's own torch
    assert not re.search(r"^\s*(torch|triton)\b|[\s-](torch|triton)[=<>]", docker, re.M)   # never installs them
