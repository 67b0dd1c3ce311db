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


def test_continued_pretraining_recipe():
    lines = _dry("examples/continued_pretraining_long_context.sh", {"HF_DIR": "llama"})
    assert shlex.split(lines[0])[1:5] == ["tools/convert_hf_checkpoint.py", "import", "--hf-dir", "llama"]
    stages = [shlex.split(x) for x in lines[1:]]
    assert [w for s in stages for w in s if w.startswith("SEQ_LENGTH=")] == ["SEQ_LENGTH=131072", "SEQ_LENGTH=262144"]
    assert "INIT_FROM=runs/long_context/stage0" in stages[0]
    assert "INIT_FROM=runs/long_context/stage1/checkpoints" in stages[1]


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
