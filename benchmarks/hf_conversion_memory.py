#!/usr/bin/env python
"""Peak memory of the HF import and export against the weights' bytes, and what it predicts for 8B.

    python benchmarks/hf_conversion_memory.py --out runs/hf_memory --json benchmarks/results/hf_conversion_memory.json

Makes a random bf16 Llama with transformers (default about 0.25B parameters; --layers, --hidden ...) and
saves it with save_pretrained, then runs ``tools/convert_hf_checkpoint.py``'s import and export, each in
its own process.  Each process first imports torch, megatron-core and transformers and sets up its
process group; that resident size is its baseline.  It then resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and converts; the figure is the peak resident size (VmHWM) above the baseline,
divided by the bytes of the HF weights.  The 8B prediction multiplies that ratio by Llama-3.1-8B's bf16
weights (8,030,261,248 parameters, 16.06 GB).  Linux only.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
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
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, megatron.core, transformers  # noqa: F401  (the baseline: these imported)
from megatron_moba.training.logs import quiet_absent_backend_warnings
quiet_absent_backend_warnings()
from megatron_moba.training.compat import apply_patches
apply_patches("torch")
from megatron_moba.hf import convert
convert._single_process()

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                       # resets VmHWM to the current resident size
t0 = time.time()
if sys.argv[1] == "import":
    convert.import_to_checkpoint(sys.argv[2], sys.argv[3])
else:
    convert.export_from_checkpoint(sys.argv[2], sys.argv[3])
print("RESULT " + json.dumps(dict(baseline_bytes=baseline, peak_bytes=status("VmHWM"), wall_s=time.time() - t0)))
"""


def _run(code, *argv):
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"failed ({argv[0]}):\n{r.stderr[-3000:]}")
    return r.stdout


def _git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="scratch directory (HF model, checkpoint, export)")
    p.add_argument("--json", default=None)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args(argv)
    if os.path.exists(a.out) and os.listdir(a.out):
        p.error(f"--out {a.out} is not empty")
    hf, mg, back = (os.path.join(a.out, x) for x in ("hf", "mg", "back"))
    t0 = time.time()
    params = int(_run(MAKE, hf, a.layers, a.hidden, a.ffn, a.heads, a.kv_heads, a.vocab).split()[-1])
    make_s = time.time() - t0
    weights = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors"))
    tensor_bytes = params * 2
    results = {}
    for what, src, dst in (("import", hf, mg), ("export", mg, back)):
        r = json.loads(_run(MEASURE, what, src, dst).split("RESULT ", 1)[1])
        over = r["peak_bytes"] - r["baseline_bytes"]
        results[what] = dict(r, peak_over_baseline_bytes=over, ratio_to_weights=over / tensor_bytes,
                             predicted_8b_gb=over / tensor_bytes * LLAMA_31_8B_PARAMS * 2 / 1e9)
        print(f"{what}: peak {over / 1e9:.3f} GB above a baseline of {r['baseline_bytes'] / 1e9:.3f} GB = "
              f"{over / tensor_bytes:.2f} x the weights ({tensor_bytes / 1e9:.3f} GB); for Llama-3.1-8B: "
              f"{results[what]['predicted_8b_gb']:.1f} GB; {r['wall_s']:.0f} s")
    import megatron.core
    import safetensors
    import torch
    import transformers
    report = {
        "what": "peak resident memory of tools/convert_hf_checkpoint.py import/export above the process's baseline "
                "(torch, megatron-core, transformers imported, process group set up), against the HF weights' bytes",
        "model": dict(params=params, dtype="bfloat16", layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads,
                      kv_heads=a.kv_heads, vocab=a.vocab, weights_bytes=tensor_bytes, safetensors_file_bytes=weights,
                      made_by=f"transformers {transformers.__version__} LlamaForCausalLM, save_pretrained",
                      make_s=make_s),
        "results": results,
        "prediction_8b": {"params": LLAMA_31_8B_PARAMS, "weights_gb": LLAMA_31_8B_PARAMS * 2 / 1e9,
                          "import_gb": results["import"]["predicted_8b_gb"],
                          "export_gb": results["export"]["predicted_8b_gb"]},
        "provenance": {"commit": _git("rev-parse", "HEAD"), "clean": _git("status", "--porcelain") == "",
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
