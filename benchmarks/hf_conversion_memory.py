#!/usr/bin/env python
"""Peak memory of the HF import and export against the weights' bytes, and what it predicts for 8B.

    python benchmarks/hf_conversion_memory.py --out runs/hf_memory --json benchmarks/results/hf_conversion_memory.json

Makes a random bf16 Llama with transformers (default about 0.25B parameters; --layers, --hidden ...) and
saves it with save_pretrained, then runs ``tools/convert_hf_checkpoint.py``'s import and export, each in
its own process.  Each process first imports torch, megatron-core and transformers and sets up its
process group; that resident size is its baseline.  It then resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and converts; the figure is the peak resident size (VmHWM) above the baseline,
or, where larger, the peak proportional set size of the process and its children (megatron-core's
checkpoint writers are forked processes; sampled every 20 ms) above theirs, divided by the bytes of
the HF weights.  The 8B prediction multiplies that ratio by Llama-3.1-8B's bf16
weights (8,030,261,248 parameters, 16.06 GB).  Linux only.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_31_8B_PARAMS = 8_030_261_248

MAKE = """
import sys, torch, transformers
out, layers, hidden, ffn, heads, kv, vocab = sys.argv[1], *map(int, sys.argv[2:8])
cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                               rope_theta=500000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
model = transformers.LlamaForCausalLM(cfg).eval()
model.config.torch_dtype = torch.bfloat16
model.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""

MEASURE = """
import json, os, sys, threading, time, warnings
warnings.filterwarnings("ignore")


def status(field, pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def tree_pss():
    # proportional set size of this process and its descendants (megatron's checkpoint writers are forked)
    pids, total, i = [str(os.getpid())], 0, 0
    while i < len(pids):
        try:
            for tid in os.listdir(f"/proc/{pids[i]}/task"):
                pids += open(f"/proc/{pids[i]}/task/{tid}/children").read().split()
            for line in open(f"/proc/{pids[i]}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        i += 1
    return total


def main():
    import torch, megatron.core, transformers  # noqa: F401  (the baseline: these imported)
    from megatron_moba.training.logs import quiet_absent_backend_warnings
    quiet_absent_backend_warnings()
    from megatron_moba.training.compat import apply_patches
    apply_patches("torch")
    from megatron_moba.hf import convert
    convert._single_process()
    baseline, baseline_pss = status("VmRSS"), tree_pss()
    peak_pss, done = [baseline_pss], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_pss[0] = max(peak_pss[0], tree_pss())
    sampler = threading.Thread(target=sample, daemon=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # resets VmHWM to the current resident size
    sampler.start()
    t0 = time.time()
    if sys.argv[1] == "import":
        convert.import_to_checkpoint(sys.argv[2], sys.argv[3])
    else:
        convert.export_from_checkpoint(sys.argv[2], sys.argv[3], max_shard_size=sys.argv[4])
    wall = time.time() - t0
    done.set()
    sampler.join()
    code = os.path.dirname(os.path.dirname(os.path.dirname(convert.__file__)))
    print("RESULT " + json.dumps(dict(code=code, baseline_bytes=baseline, peak_bytes=status("VmHWM"), wall_s=wall,
                                      baseline_tree_pss_bytes=baseline_pss, peak_tree_pss_bytes=peak_pss[0])))


if __name__ == "__main__":
    main()
"""


def _run(code, *argv):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:      # a file: megatron's writers spawn
        f.write(code)
    try:
        r = subprocess.run([sys.executable, f.name, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    finally:
        os.remove(f.name)
    if r.returncode:
        raise SystemExit(f"failed ({argv[0]}):\n{r.stderr[-3000:]}")
    return r.stdout


def _git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()


TINY = dict(layers=2, hidden=128, ffn=256, heads=4, kv_heads=2, vocab=1000)


def measure(out: str, shape: dict, max_shard_size: str) -> dict:
    """Make the model ``shape`` describes under ``out``, import and export it; peaks above the baselines."""
    hf, mg, back = (os.path.join(out, x) for x in ("hf", "mg", "back"))
    t0 = time.time()
    params = int(_run(MAKE, hf, *(shape[k] for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")))
                 .split()[-1])
    model = dict(shape, params=params, dtype="bfloat16", weights_bytes=params * 2, make_s=time.time() - t0,
                 safetensors_file_bytes=sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf)
                                            if f.endswith(".safetensors")))
    results = {}
    for what, src, dst in (("import", hf, mg), ("export", mg, back)):
        r = json.loads(_run(MEASURE, what, src, dst, max_shard_size).split("RESULT ", 1)[1])
        if os.path.realpath(r.pop("code")) != os.path.realpath(ROOT):
            raise SystemExit(f"the conversion ran another checkout's megatron_moba, not {ROOT}'s: install this one "
                             "or set PYTHONPATH")
        # the larger of the process's own peak (VmHWM, exact) and the sampled peak of it and its children
        over = max(r["peak_bytes"] - r["baseline_bytes"], r["peak_tree_pss_bytes"] - r["baseline_tree_pss_bytes"])
        results[what] = dict(r, peak_over_baseline_bytes=over, ratio_to_weights=over / model["weights_bytes"])
        print(f"{params:,} parameters, {what}: peak {over / 1e9:.3f} GB above a baseline of "
              f"{r['baseline_bytes'] / 1e9:.3f} GB = {over / model['weights_bytes']:.2f} x the weights "
              f"({model['weights_bytes'] / 1e9:.3f} GB); {r['wall_s']:.0f} s", flush=True)
    return {"model": model, "results": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="scratch directory (HF models, checkpoints, exports)")
    p.add_argument("--json", default=None)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-shard-size", default="5GB", help="of the export (as tools/convert_hf_checkpoint.py)")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and os.listdir(a.out):
        p.error(f"--out {a.out} is not empty")
    commit, clean = _git("rev-parse", "HEAD"), _git("status", "--porcelain") == ""     # the code as it ran
    shape = dict(layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab)
    main_run = measure(os.path.join(a.out, "model"), shape, a.max_shard_size)
    tiny_run = measure(os.path.join(a.out, "tiny"), TINY, a.max_shard_size)
    w8b = LLAMA_31_8B_PARAMS * 2
    prediction = {"params": LLAMA_31_8B_PARAMS, "weights_gb": w8b / 1e9}
    for what in ("import", "export"):
        big, small = main_run["results"][what], tiny_run["results"][what]
        wb, ws = main_run["model"]["weights_bytes"], tiny_run["model"]["weights_bytes"]
        slope = (big["peak_over_baseline_bytes"] - small["peak_over_baseline_bytes"]) / (wb - ws)
        fixed = big["peak_over_baseline_bytes"] - slope * wb
        prediction[what] = {
            "bytes_per_weight_byte": slope, "fixed_gb": fixed / 1e9, "predicted_gb": (fixed + slope * w8b) / 1e9,
            "predicted_ratio": (fixed + slope * w8b) / w8b,
            "ratio_at_measured_size_gb": big["ratio_to_weights"] * w8b / 1e9}
        print(f"Llama-3.1-8B {what}: {fixed / 1e9:.2f} GB + {slope:.2f} x {w8b / 1e9:.2f} GB = "
              f"{(fixed + slope * w8b) / 1e9:.1f} GB above the baseline ({(fixed + slope * w8b) / w8b:.2f} x the "
              f"weights; the measured model's ratio alone: {big['ratio_to_weights'] * w8b / 1e9:.1f} GB)")
    import megatron.core
    import safetensors
    import torch
    import transformers
    report = {
        "what": "peak memory of tools/convert_hf_checkpoint.py import/export above the process's baseline (torch, "
                "megatron-core, transformers imported, process group set up), against the HF weights' bytes; the 8B "
                "prediction fits fixed + slope x weights through the measured model and a tiny one",
        "export_max_shard_size": a.max_shard_size,
        "made_by": f"transformers {transformers.__version__} LlamaForCausalLM (random, bf16), save_pretrained",
        "measured": main_run, "tiny": tiny_run, "prediction_8b": prediction,
        "provenance": {"commit": commit, "clean_at_start": clean,
                       "python": platform.python_version(), "torch": torch.__version__,
                       "megatron_core": megatron.core.__version__, "transformers": transformers.__version__,
                       "safetensors": safetensors.__version__, "machine": platform.machine(),
                       "cpus": os.cpu_count(), "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                       / 1e9, "platform": platform.platform()},
    }
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
