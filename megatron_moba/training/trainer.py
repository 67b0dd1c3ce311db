"""The training loop: set up, then step / log / evaluate / save until --train-iters.

Reads as a recipe: ``pretrain(args)`` = distributed setup -> tokenizer, model, optimizer,
schedule -> optional checkpoint load -> data -> loop.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moba.core.errors import ConfigurationError
from megatron_moba.training.checkpointing import check_save_dir, drop_metrics_after, load_checkpoint, save_checkpoint
from megatron_moba.training.data import MicroBatches, build_datasets, check_data
from megatron_moba.training.flops import flops_per_iteration, memory_gib, peak_tflops
from megatron_moba.training.logs import quiet_absent_backend_warnings, setup_logging
from megatron_moba.training.model import build_model
from megatron_moba.training.optimizer import build_optimizer
from megatron_moba.training.parallel import initialize_distributed
from megatron_moba.training.tokenizer import build_tokenizer


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _write(stream, text: str) -> None:
    """Unbuffered write to ``stream``'s file descriptor (safe inside a signal handler)."""
    try:
        os.write(stream.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):      # no file descriptor (a captured stream)
        pass


def document_cu_seqlens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] tokens -> int32 cu_seqlens of the documents in the flattened batch (a document
    ends after each EOD token and at each sample's end)."""
    ends = (tokens == eod).clone()
    ends[:, -1] = True
    flat_ends = torch.nonzero(ends.flatten()).squeeze(1) + 1
    return torch.cat([flat_ends.new_zeros(1), flat_ends]).to(torch.int32)


def cp_local_batch(batch: dict) -> dict:
    """This context-parallel rank's chunks r and 2cp-1-r of every sample."""
    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    if cp == 1:
        return batch

    def split(x):
        chunks = x.view(x.shape[0], 2 * cp, -1, *x.shape[2:])
        return torch.cat([chunks[:, r], chunks[:, 2 * cp - 1 - r]], dim=1)
    return {k: split(v) for k, v in batch.items()}


def forward_step(data_iterator, model, eod: int = None, document_attention: bool = False):
    batch = cp_local_batch(next(data_iterator))
    device = next(model.parameters()).device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    position_ids, loss_mask = batch["position_ids"].to(device), batch["loss_mask"].to(device)
    packed = None
    if document_attention:
        cu = document_cu_seqlens(tokens, eod).to(device)
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        shape = labels.shape
        tokens, labels, position_ids = (x.reshape(1, -1) for x in (tokens, labels, position_ids))
    output = model(tokens, position_ids, attention_mask=None, labels=labels, packed_seq_params=packed)
    if packed is not None:
        output = output.reshape(shape)

    def loss_func(per_token):            # (masked loss sum, token count, report): the schedule divides
        mask = loss_mask.float()
        total = (per_token.float() * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}
    return output, loss_func


def count_parameters(model) -> int:
    """Parameters of the whole model over all TP/PP ranks (tensor-parallel replicas, and the last
    stage's copy of tied embeddings, counted once).  A collective over the model-parallel group."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    tied = None
    if getattr(model, "share_embeddings_and_output_weights", False) and not getattr(model, "pre_process", True):
        tied = model.shared_embedding_or_output_weight()
    n = sum(p.numel() for p in model.parameters() if p is not tied and param_is_not_tensor_parallel_duplicate(p))
    total = torch.tensor([float(n)], dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return int(total.item())


class Trainer:
    clock = staticmethod(time.perf_counter)      # times the training steps (tokens/s, ms per iteration)

    def __init__(self, args):
        self.args = args
        self.start_time = time.time()             # --exit-duration-in-mins counts from here
        quiet_absent_backend_warnings()
        setup_logging(getattr(args, "logging_level", None), int(os.environ.get("RANK", "0")))
        initialize_distributed(args)
        check_data(args)           # a bad --split or a damaged --data-path fails before the model is built
        if getattr(args, "ckpt_step", None) is not None and not args.load:
            raise ConfigurationError("--ckpt-step needs --load")
        # refuses a --save directory whose checkpoints this run would overwrite instead of resuming (before
        # the model is built: quick to fail)
        fresh = check_save_dir(args.save, args.load, args.finetune, getattr(args, "ckpt_step", None))
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.model = build_model(args, self.tokenizer)           # the bare GPT: what checkpoints hold
        self.config = self.model.config
        self.optimizer = build_optimizer(args, self.model)        # .model: the GPT as the schedules run it
        decay_iters = args.lr_decay_iters or args.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=decay_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=not getattr(args, "override_opt_param_scheduler", False),
            override_opt_param_scheduler=getattr(args, "override_opt_param_scheduler", False))
        self.iteration, self.consumed = 0, 0
        self.carried = {}    # e.g. the HF config of an imported checkpoint: kept in every save
        self.loaded = bool(args.load) and not fresh       # what the start summary reports
        if fresh:    # --load = --save with nothing saved yet: a (re)queued job's first start
            _log(f"no checkpoint in {args.load} yet: starting from scratch")
        elif args.load:
            self.iteration, self.consumed = load_checkpoint(
                args.load, self.model, None if args.no_load_optim else self.optimizer,
                self.scheduler, finetune=args.finetune, iteration=getattr(args, "ckpt_step", None), args=args,
                carry=self.carried)
            if args.finetune or args.no_load_optim:
                self.optimizer.reload_model_params()      # fp32 main weights <- the loaded weights
            _log(f"loaded {args.load} at iteration {self.iteration}")
        train, valid, _ = build_datasets(args, self.tokenizer, checked=True)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.train_batches = MicroBatches(train, args.micro_batch_size, dp_rank, dp, self.consumed)
        self.valid_set = valid
        self.fb = get_forward_backward_func()
        self.step_fn = partial(forward_step, eod=self.tokenizer.eod, document_attention=args.document_attention)
        self.stop_requested, self.stop_signal = False, None
        if self.iteration and dist.get_rank() == 0:     # a resume: drop what a crashed run logged after its save
            dropped = drop_metrics_after(args.metrics_file, self.iteration)
            if dropped:
                _log(f"dropped {dropped} lines past iteration {self.iteration} from --metrics-file "
                     f"{args.metrics_file} (logged after the last checkpoint)")
        self.metrics = open(args.metrics_file, "a") if args.metrics_file and dist.get_rank() == 0 else None
        self.tb = None
        if args.tensorboard_dir and dist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(args.tensorboard_dir)

    # ---------------------------------------------------------------- one step
    def _run(self, batches, forward_only: bool):
        a = self.args
        out = self.fb(forward_step_func=self.step_fn, data_iterator=batches, model=[self.optimizer.model],
                      num_microbatches=a.num_microbatches, seq_length=a.seq_length // a.context_parallel_size,
                      micro_batch_size=a.micro_batch_size, forward_only=forward_only)
        stats = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage():
            for o in out:
                stats += torch.stack([o["loss_sum"].double().cpu(), o["tokens"].double().cpu()])
        dev = next(self.model.parameters()).device
        stats = stats.to(dev)
        dist.all_reduce(stats, group=ps.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())   # last stage -> all stages
        return float(stats[0] / stats[1].clamp(min=1))

    def train_step(self) -> dict:
        self.optimizer.zero_grad()
        loss = self._run(self.train_batches, forward_only=False)
        stepped, norm = self.optimizer.step() if math.isfinite(loss) else (False, float("nan"))
        if stepped:
            self.scheduler.step(increment=1)
        m = dict(loss=loss, grad_norm=norm, skipped=not stepped, lr=self.optimizer.param_groups[0]["lr"])
        scale = getattr(self.optimizer, "loss_scale", None)
        if scale is not None:                      # --fp16
            m["loss_scale"] = scale
        return m

    def evaluate(self) -> float:
        a = self.args
        batches = MicroBatches(self.valid_set, a.micro_batch_size, ps.get_data_parallel_rank(),
                               ps.get_data_parallel_world_size())
        self.optimizer.model.eval()
        with torch.no_grad():
            losses = [self._run(batches, forward_only=True) for _ in range(a.eval_iters)]
        self.optimizer.model.train()
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------- the loop
    def save(self):
        save_checkpoint(self.args.save, self.iteration, self.model, self.optimizer, self.scheduler,
                        self.train_batches.consumed, self.args, extra=self.carried)
        _log(f"saved checkpoint at iteration {self.iteration} to {self.args.save}")

    def record(self, values: dict):
        if self.metrics:
            self.metrics.write(json.dumps({"iteration": self.iteration, **values}) + "\n")
            self.metrics.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, self.iteration)

    def train(self) -> list:
        a = self.args
        if self.iteration >= a.train_iters:     # a resume of a finished run: nothing to do, not an error
            _log(f"{a.load} is at iteration {self.iteration}, and --train-iters is {a.train_iters}: the run is "
                 "complete, nothing to train (raise --train-iters to continue it)")
            return []
        handlers = {}
        if threading.current_thread() is threading.main_thread():      # SIGTERM, Ctrl-C: save, then stop
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        # os.write, not print: a handler may run in the middle of a print to the same stream
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_signal == "SIGINT":     # a second Ctrl-C: exit at once
            _write(sys.stderr, "second SIGINT: exiting at once, without saving\n")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        self.stop_requested, self.stop_signal = True, self.stop_signal or name
        if dist.get_rank() == 0:
            _write(sys.stdout, f"{name} received: stopping after this iteration"
                   + (", saving a checkpoint" if self.args.save else "")
                   + (" (Ctrl-C again exits at once)" if signum == signal.SIGINT else "") + "\n")

    def log_summary(self) -> None:
        """What this run is: layout, device, size, batch and what it starts from (rank 0 prints)."""
        a = self.args
        params = count_parameters(self.model)          # a collective: every rank
        device = next(self.model.parameters()).device
        dev = f"{torch.cuda.get_device_name(device)} (cuda)" if device.type == "cuda" else "cpu"
        if self.loaded:
            start = (f"weights of {a.load} (--finetune: iteration, optimizer and data start afresh)" if a.finetune
                     else f"checkpoint {a.load} at iteration {self.iteration}"
                     + (" (without its optimizer state: --no-load-optim)" if a.no_load_optim else ""))
        else:
            start = f"from scratch (seed {a.seed})"
        precision = "fp16" if getattr(a, "fp16", False) else "bf16" if a.bf16 else "fp32"
        _log(f"world size {dist.get_world_size()}: tensor parallel {a.tensor_model_parallel_size}, pipeline parallel "
             f"{a.pipeline_model_parallel_size}, context parallel {a.context_parallel_size}, data parallel "
             f"{a.data_parallel_size} | device {dev}\n"
             f"model: {params:,} parameters, {a.num_layers} layers"
             + (f" (HybridModel {a.hybrid_layer_pattern!r})" if getattr(a, "hybrid_layer_pattern", None) else "")
             + f", attention {a.attention}, {precision}, "
             f"optimizer {a.optimizer_impl}"
             + (f", recompute {a.recompute_granularity}" if getattr(a, "recompute_granularity", None) else "") + "\n"
             f"tokens per step: {a.global_batch_size * a.seq_length:,} (global batch {a.global_batch_size} x "
             f"sequence length {a.seq_length}; {a.num_microbatches} micro-batches of {a.micro_batch_size} per "
             f"data-parallel rank) | iterations {self.iteration} -> {a.train_iters}\n"
             f"start: {start}")
        if not getattr(a, "hybrid_layer_pattern", None):
            from megatron_moba.core.versions import hybrid_model_available
            if hybrid_model_available():            # megatron-core 0.19+ logs "GPTModel IS DEPRECATED" above
                from megatron_moba.core.hybrid_pattern import gpt_pattern
                _log(f"note: a GPTModel (the job's default); the same model as megatron-core's HybridModel: "
                     f"--num-layers {2 * a.num_layers} --hybrid-layer-pattern '{gpt_pattern(a.num_layers)}'")

    def _loss_scale_can_drop(self, m: dict) -> bool:
        """An fp16 step skipped because dynamic loss scaling found an overflow (the scale goes down)."""
        a = self.args
        return (getattr(a, "fp16", False) and a.loss_scale is None and math.isfinite(m["loss"])
                and m.get("loss_scale") is not None and m["loss_scale"] > a.min_loss_scale)

    def _loop(self) -> list:
        a = self.args
        self.log_summary()
        losses, bad_in_row = [], 0
        tokens_per_step = a.global_batch_size * a.seq_length
        flops_per_step, peak = flops_per_iteration(a, self.config), peak_tflops()
        step_time, steps_timed, skipped = 0.0, 0, 0     # since the last log line: training steps only
        device = next(self.model.parameters()).device
        while self.iteration < a.train_iters:
            t0 = self.clock()
            m = self.train_step()
            step_time += self.clock() - t0
            steps_timed += 1
            self.iteration += 1
            losses.append(m["loss"])
            skipped += m["skipped"]
            if m["skipped"] and self._loss_scale_can_drop(m):
                _log(f"iteration {self.iteration}: fp16 gradient overflow, step skipped; loss scale now "
                     f"{m['loss_scale']:g}")
            elif m["skipped"]:
                bad_in_row += 1
                _log(f"iteration {self.iteration}: non-finite loss or gradient (loss {m['loss']}, grad norm "
                     f"{m['grad_norm']}): step skipped ({bad_in_row} in a row)")
                if bad_in_row >= a.max_nonfinite_steps:
                    raise RuntimeError(f"{bad_in_row} consecutive non-finite steps (--max-nonfinite-steps "
                                       f"{a.max_nonfinite_steps}): stopping; lower --lr or check the data")
            else:
                bad_in_row = 0
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                dt = step_time / steps_timed          # evaluation and checkpoint saves left out
                tflops = flops_per_step / dt / dist.get_world_size() / 1e12
                m.update(consumed_samples=self.train_batches.consumed, step_time_s=dt,
                         tokens_per_s=tokens_per_step / dt, tflops_per_device=tflops,
                         mfu=tflops / peak if peak else None, memory_gib=memory_gib(), skipped_iterations=skipped)
                _log(f"iteration {self.iteration:>6}/{a.train_iters} | consumed samples: {m['consumed_samples']} | "
                     f"elapsed time per iteration (ms): {1000 * dt:.1f} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
                     f"grad norm {m['grad_norm']:.3f}"
                     + (f" | loss scale {m['loss_scale']:g}" if "loss_scale" in m else "")
                     + (f" | skipped iterations {skipped}" if skipped else "")
                     + f" | {m['tokens_per_s']:.0f} tokens/s | {tflops:.3f} TFLOP/s/device"
                     + (f" | MFU {100 * m['mfu']:.1f}%" if peak else "") + f" | mem {m['memory_gib']:.2f} GiB")
                self.record(m)
                step_time, steps_timed, skipped = 0.0, 0, 0
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                val = self.evaluate()
                _log(f"iteration {self.iteration:>6} | validation loss {val:.4f}")
                self.record({"valid_loss": val})
            minutes = (time.time() - self.start_time) / 60
            out_of_time = bool(a.exit_duration_in_mins) and minutes >= a.exit_duration_in_mins
            flags = torch.tensor([float(self.stop_requested), float(out_of_time)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)     # every rank saves and stops together
            signalled, out_of_time = bool(flags[0]), bool(flags[1])
            stop = signalled or out_of_time or bool(a.exit_interval and self.iteration % a.exit_interval == 0)
            if a.save and (stop or (a.save_interval and self.iteration % a.save_interval == 0)
                           or self.iteration in (a.save_iterations or ()) or self.iteration == a.train_iters):
                self.save()
            if stop:
                why = ((self.stop_signal or "a signal on another rank") if signalled
                       else f"--exit-duration-in-mins {a.exit_duration_in_mins:g}" if out_of_time
                       else "--exit-interval")
                _log(f"{why}: stopping at iteration {self.iteration}" + (" (checkpoint saved)" if a.save else ""))
                break
        return losses


def pretrain(args) -> list:
    """Train; returns the per-iteration training losses of this run."""
    return Trainer(args).train()
