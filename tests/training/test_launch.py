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
    words = shlex.split(_dry("examples/pretrain_gpt_moba_single_node.sh", {"TP": "2", "CP": "2", "MOCK_DATA": "1"})[0])
    assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    args = parse_args(_trainer_flags(words), world_size=8)
    assert (args.tensor_model_parallel_size, args.context_parallel_size, args.data_parallel_size) == (2, 2, 2)
    assert args.sequence_parallel and args.moba_chunk_size == 512 and args.moba_topk == 3 and args.seq_length == 32768
    assert args.mock_data


def test_mock_data_only_when_asked_for():
    e = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "MOCK_DATA")}
    r = subprocess.run(["bash", os.path.join(ROOT, "examples/pretrain_gpt_moba_single_node.sh")], capture_output=True,
                       text=True, env=dict(e, DRY_RUN="1"), cwd=ROOT)
    assert r.returncode == 2 and "set DATA_PATH" in r.stderr and "MOCK_DATA=1" in r.stderr and not r.stdout
    words = shlex.split(_dry("examples/pretrain_gpt_moba_single_node.sh", {"DATA_PATH": "data/c",
                                                                           "TOKENIZER_MODEL": "spm.model"})[0])
    args = parse_args(_trainer_flags(words), world_size=8)
    assert args.data_path == ["data/c"] and not args.mock_data


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


def _sbatch_trainer_flags(env, fake_slurm):
    """The trainer's flags in the sbatch script's DRY_RUN command."""
    inner = shlex.split(shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])[5]
                        .replace("$SLURM_NODEID", "0"))
    return _trainer_flags(inner[:-2])


def test_slurm_script_container_mounts(fake_slurm):
    env = {"SLURM_JOB_NODELIST": "node[1-1]", "SLURM_NNODES": "1", "MOCK_DATA": "1", "CONTAINER_IMAGE": "img.sqsh",
           "CONTAINER_MOUNTS": "/lustre/data:/lustre/data,/models"}
    words = shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])
    assert words[words.index("--container-image") + 1] == "img.sqsh"
    assert words[words.index("--container-mounts") + 1] == f"{ROOT}:{ROOT},/lustre/data:/lustre/data,/models"


@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_script_builds_the_rendezvous(fake_slurm, nodes):
    env = {"SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "moba", "TP": "2", "CP": "4", "MOCK_DATA": "1"}
    words = shlex.split(_dry("examples/slurm/pretrain_gpt_moba.sbatch", env, fake_slurm)[0])
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert words[3:5] == ["bash", "-c"]
    inner = shlex.split(words[5].replace("$SLURM_NODEID", "NODEID"))
    assert inner[:3] == ["exec", "env", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240"]     # torchrun's wait for the save
    inner = inner[3:]
    assert inner[:3] == ["torchrun", "--nnodes", str(nodes)]
    assert inner[inner.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert inner[inner.index("--rdzv-id") + 1] == "4242"
    assert inner[-2:] == ["--node-rank", "NODEID"]             # expanded by each node's own shell
    args = parse_args(_trainer_flags(inner[:-2]), world_size=nodes * 8)
    assert args.save == args.load == "runs/moba-4242/checkpoints"
    assert args.data_parallel_size == nodes * 8 // 8


def test_slurm_script_starts_a_stage_from_another_checkpoint(fake_slurm):
    env = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "INIT_FROM": "runs/stage0",
           "SEQ_LENGTH": "131072", "CP": "8", "TP": "2", "MOCK_DATA": "1"}
    args = parse_args(_sbatch_trainer_flags(env, fake_slurm), world_size=16)
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


@pytest.fixture
def llama_hf_dir(tmp_path):
    """Meta-Llama-3.1-8B's config.json and a stand-in tokenizer (no weights)."""
    import json

    from tokenizers import Tokenizer, models
    hf = tmp_path / "Meta-Llama-3.1-8B"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    Tokenizer(models.WordLevel({"<unk>": 0, "<|end_of_text|>": 1, "a": 2}, unk_token="<unk>")).save(
        str(hf / "tokenizer.json"))
    return str(hf)


def _recipe(env, path_prefix=None, dry=True):
    import sys
    e = dict({k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "MOCK_DATA", "STAGES", "TP")},
             PYTHON=sys.executable, **env)
    if dry:
        e["DRY_RUN"] = "1"
    if path_prefix:
        e["PATH"] = f"{path_prefix}:{e['PATH']}"
    return subprocess.run(["bash", os.path.join(ROOT, "examples/continued_pretraining_long_context.sh")],
                          capture_output=True, text=True, env=e, cwd=ROOT)


def test_continued_pretraining_recipe(llama_hf_dir, fake_slurm):
    """The recipe on Llama 3.1 8B's config with its defaults: every stage is checked at 64 GPUs before the
    commands, and trains the imported model (its flags, from the tool: RoPE scaling, tokenizer, vocabulary)
    with the recipe's RoPE base, its own context and positions, MoBA, and its own slice of the documents."""
    from megatron_moba.hf.convert import model_flags, read_hf_config, tokenizer_flags
    hf = llama_hf_dir
    r = _recipe({"HF_DIR": hf, "MOCK_DATA": "1", "SLURM_NNODES": "1"})     # run from a 1-node allocation
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    checks = [x for x in lines if x.startswith("stage ")]
    assert len(checks) == 2 and all(": ok: 64 GPUs = TP 8 x CP " in x for x in checks)
    assert "sequence 131072, max positions 131072, RoPE base 5000000 (Llama 3 scaling x8)" in checks[0]
    assert "sequence 262144, max positions 262144, RoPE base 5000000 (Llama 3 scaling x8)" in checks[1]
    commands = [shlex.split(x) for x in lines if not x.startswith("stage ")]
    assert lines.index(checks[-1]) < min(lines.index(x) for x in lines if not x.startswith("stage "))
    assert commands[0] == ["mkdir", "-p", "runs/long_context/logs"]
    assert commands[1][:5] == ["srun", "--nodes=1", "--ntasks=1", "--exclusive", "--job-name"]     # a compute node
    assert commands[1][-6:] == ["tools/convert_hf_checkpoint.py", "import", "--hf-dir", hf, "--save",
                                "runs/long_context/stage0"]
    assert commands[-1][0] == "srun" and commands[-1][-6:] == [
        "tools/convert_hf_checkpoint.py", "export", "--load", "runs/long_context/stage2/checkpoints", "--out",
        "runs/long_context/hf"]
    stages = commands[2:-1]
    assert [w for s in stages for w in s if w.startswith("SEQ_LENGTH=")] == ["SEQ_LENGTH=131072", "SEQ_LENGTH=262144"]
    assert "INIT_FROM=runs/long_context/stage0" in stages[0]
    assert "INIT_FROM=runs/long_context/stage1/checkpoints" in stages[1]
    cfg = read_hf_config(hf)
    imported = parse_args(model_flags(cfg) + tokenizer_flags(hf, cfg) + [
        "--seq-length", "64", "--train-iters", "1", "--mock-data"], world_size=1)
    slices = []
    for n, stage in enumerate(stages):
        sbatch = stage.index("sbatch")
        assert stage[sbatch:sbatch + 8] == ["sbatch", "--wait", "--nodes", "8", "--gpus-per-node", "8", "--job-name",
                                            f"moba-long-{n + 1}"]
        assert stage[stage.index("--output") + 1] == "runs/long_context/logs/%x-%j.out"
        stage_env = dict(w.split("=", 1) for w in stage[1:sbatch])
        env = {"SLURM_JOB_NODELIST": "node[1-8]", "SLURM_NNODES": "8", "SLURM_JOB_ID": "7", "ROTARY_BASE": "5000000",
               "MOBA_CHUNK": "4096", "MOBA_TOPK": "12", "MOBA_FULL_LAYERS": "3", "TP": "8", "MOCK_DATA": "1",
               "GLOBAL_BATCH": "32", **stage_env}
        flags = _sbatch_trainer_flags(env, fake_slurm)
        assert flags.count("--max-position-embeddings") == flags.count("--rotary-base") == 1
        job = parse_args(flags, world_size=64)
        assert {k: getattr(job, k) for k in MODEL_FIELDS} == {k: getattr(imported, k) for k in MODEL_FIELDS}
        assert (job.use_rope_scaling, job.rope_scaling_factor, job.vocab_size) == (True, 8.0, 128256)
        assert (job.tokenizer_type, job.tokenizer_model) == ("HuggingFaceTokenizer", hf)
        seq = 131072 * (n + 1)
        assert (job.rotary_base, job.seq_length, job.max_position_embeddings) == (5000000, seq, seq)
        assert (job.moba_chunk_size, job.moba_topk, job.moba_full_attn_layers) == (4096, 12, 3)
        assert job.context_parallel_size == 4 * (n + 1) and job.data_parallel_size == 2 // (n + 1)
        assert job.finetune and job.load == ("runs/long_context/stage0", "runs/long_context/stage1/checkpoints")[n]
        slices.append(job.train_data_slice)
    # disjoint, covering, in proportion to the stages' tokens (131072 and 262144 per sample)
    assert slices[0][0] == 0.0 and slices[0][1] == slices[1][0] and slices[1][1] == 1.0
    assert slices[0][1] == pytest.approx(1 / 3, abs=1e-6)


def test_recipe_refuses_a_stage_that_does_not_fit_before_submitting(llama_hf_dir, tmp_path):
    """The old defaults (CP 16 at stage 2 = 128 GPUs on 64): the recipe names stage 2 and submits nothing,
    in the dry run and in the real run (sbatch and srun would record their calls)."""
    calls = tmp_path / "calls"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_ / tool).write_text(f'#!/bin/bash\necho {tool} "$@" >> {calls}\n')
        os.chmod(bin_ / tool, 0o755)
    for dry in (True, False):
        r = _recipe({"HF_DIR": llama_hf_dir, "MOCK_DATA": "1", "STAGES": "131072:8 262144:16",
                     "WORK": str(tmp_path / "work")}, str(bin_), dry=dry)
        assert r.returncode == 2
        assert "stage 2 (seq 262144, CP 16, 64 GPUs): error: world size (64) is not divisible by" in r.stderr
        assert "error: stage 2 (262144:16 of STAGES) does not fit NODES=8 x GPUS_PER_NODE=8; nothing was submitted" \
            in r.stderr
        assert "stage 1 (seq 131072, CP 8, 64 GPUs): ok" in r.stdout
        assert not calls.exists() and not (tmp_path / "work").exists()


def test_recipe_needs_data_or_mock_data(llama_hf_dir):
    r = _recipe({"HF_DIR": llama_hf_dir})
    assert r.returncode == 2 and "set DATA_PATH" in r.stderr and "MOCK_DATA=1" in r.stderr and not r.stdout


def test_recipe_mounts_model_data_and_work_into_the_container(llama_hf_dir, tmp_path):
    """With CONTAINER_IMAGE, the model's, the data's and the run's directories are mounted (the data files
    are checked up front: they exist here)."""
    from megatron_moba.training.preprocess import build_indexed_dataset
    data = tmp_path / "data"
    data.mkdir()
    texts = [" ".join(["a"] * 50) for _ in range(40)]
    build_indexed_dataset(iter(texts), str(data / "corpus"), "HuggingFaceTokenizer", tokenizer_model=llama_hf_dir,
                          progress=False)
    r = _recipe({"HF_DIR": llama_hf_dir, "DATA_PATH": str(data / "corpus"), "CONTAINER_IMAGE": "img.sqsh",
                 "WORK": str(tmp_path / "work"), "STAGES": "131072:8"})
    assert r.returncode == 0, r.stderr
    srun = shlex.split([x for x in r.stdout.splitlines() if x.startswith("srun")][0])
    mounts = srun[srun.index("--container-mounts") + 1].split(",")
    real = os.path.realpath
    assert mounts == [f"{ROOT}:{ROOT}", f"{real(llama_hf_dir)}:{real(llama_hf_dir)}",
                      f"{tmp_path}/work:{tmp_path}/work", f"{real(data)}:{real(data)}"]
    assert "data " + str(data / "corpus") + " (training documents 0-1)" in r.stdout


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
