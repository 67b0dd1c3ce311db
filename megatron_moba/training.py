"""The training loop: set up, then step / log / evaluate / save until --train-iters.

Reads as a recipe: ``pretrain(args)`` = distributed setup -> tokenizer, model, optimizer,
schedule -> optional checkpoint load -> data -> loop.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from .checkpointing import LATEST, load_checkpoint, save_checkpoint
from .data import MicroBatches, build_datasets
from .evaluation import build_model
from .flops import flops_per_iteration, memory_gib, peak_tflops
from .optimizer import build_optimizer
from .parallel import initialize_distributed
from .tokenizer import build_tokenizer


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


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


class Trainer:
    def __init__(self, args):
        self.args = args
        initialize_distributed(args)
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.model = build_model(args, self.tokenizer)           # the bare GPT: what checkpoints hold
        self.config = self.model.config
        self.optimizer = build_optimizer(args, self.model)        # .model: the GPT as the schedules run it
        decay_iters = args.lr_decay_iters or args.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=decay_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant")
        self.iteration, self.consumed = 0, 0
        fresh = (args.load and args.save and os.path.abspath(args.load) == os.path.abspath(args.save)
                 and not os.path.exists(os.path.join(args.load, LATEST)))
        if fresh:    # --load = --save with nothing saved yet: a (re)queued job's first start
            _log(f"no checkpoint in {args.load} yet: starting from scratch")
        elif args.load:
            self.iteration, self.consumed = load_checkpoint(
                args.load, self.model, None if args.no_load_optim else self.optimizer,
                self.scheduler, finetune=args.finetune)
            if args.finetune or args.no_load_optim:
                self.optimizer.reload_model_params()      # fp32 main weights <- the loaded weights
            _log(f"loaded {args.load} at iteration {self.iteration}")
        train, valid, _ = build_datasets(args, self.tokenizer)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.train_batches = MicroBatches(train, args.micro_batch_size, dp_rank, dp, self.consumed)
        self.valid_set = valid
        self.fb = get_forward_backward_func()
        self.step_fn = partial(forward_step, eod=self.tokenizer.eod, document_attention=args.document_attention)
        self.stop_requested = False
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
        return dict(loss=loss, grad_norm=norm, skipped=not stepped, lr=self.optimizer.param_groups[0]["lr"])

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
                        self.train_batches.consumed, self.args)
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
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        losses, bad_in_row = [], 0
        tokens_per_step = a.global_batch_size * a.seq_length
        flops_per_step, peak = flops_per_iteration(a, self.config), peak_tflops()
        t0 = time.perf_counter()
        while self.iteration < a.train_iters:
            m = self.train_step()
            self.iteration += 1
            losses.append(m["loss"])
            if m["skipped"]:
                bad_in_row += 1
                _log(f"iteration {self.iteration}: non-finite loss or gradient (loss {m['loss']}, grad norm "
                     f"{m['grad_norm']}): step skipped ({bad_in_row} in a row)")
                if bad_in_row >= a.max_nonfinite_steps:
                    raise RuntimeError(f"{bad_in_row} consecutive non-finite steps (--max-nonfinite-steps "
                                       f"{a.max_nonfinite_steps}): stopping; lower --lr or check the data")
            else:
                bad_in_row = 0
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                dt = (time.perf_counter() - t0) / a.log_interval
                t0 = time.perf_counter()
                tflops = flops_per_step / dt / dist.get_world_size() / 1e12
                m.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt, tflops_per_device=tflops,
                         mfu=tflops / peak if peak else None, memory_gib=memory_gib())
                _log(f"iteration {self.iteration:>6}/{a.train_iters} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
                     f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tokens/s | "
                     f"{tflops:.3f} TFLOP/s/device" + (f" | MFU {100 * m['mfu']:.1f}%" if peak else "") +
                     f" | mem {m['memory_gib']:.2f} GiB")
                self.record(m)
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                val = self.evaluate()
                _log(f"iteration {self.iteration:>6} | validation loss {val:.4f}")
                self.record({"valid_loss": val})
            flag = torch.tensor(float(self.stop_requested), device=next(self.model.parameters()).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)     # every rank saves and stops together
            stop = bool(flag) or bool(a.exit_interval and self.iteration % a.exit_interval == 0)
            if a.save and (stop or (a.save_interval and self.iteration % a.save_interval == 0)
                           or self.iteration == a.train_iters):
                self.save()
            if stop:
                why = "SIGTERM" if bool(flag) else "--exit-interval"
                _log(f"{why}: stopping at iteration {self.iteration}" + (" (checkpoint saved)" if a.save else ""))
                break
        return losses


def pretrain(args) -> list:
    """Train; returns the per-iteration training losses of this run."""
    return Trainer(args).train()
