"""The training loop: Megatron-Core schedules, DDP, optimizer and checkpoints.

The loop holds only what every run needs (forward/backward through
``get_forward_backward_func``, optimizer + LR step, metrics, checkpoints,
resume). Everything else attaches through the callback seam
(:mod:`megatron_align.training.callbacks`); data arrives through the data seam
(:class:`megatron_align.data.loader.TrainData`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from functools import partial

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_align.config import RootConfig
from megatron_align.config.checks import resolve_tristate
from megatron_align.config.loader import config_to_dict
from megatron_align.config.schedule import resolve_schedule, schedule_changes
from megatron_align.convert import megatron_lm as mlm
from megatron_align.data.documents import run_attention_span
from megatron_align.data.loader import TrainData
from megatron_align.errors import UserError
from megatron_align.model.builder import build_model_chunks, padded_vocab_size, resolve_precision, resolve_spec
from megatron_align.model.documents import ModelInputs, attention_path
from megatron_align.parallel.init import batch_on_this_cp_rank
from megatron_align.parallel.layout import Layout
from megatron_align.training import megatron_lm_state as mlm_state
from megatron_align.training.callbacks import Callback, CallbackList
from megatron_align.training.checkpoint import CheckpointManager, read_marker, resolve_checkpoint
from megatron_align.training.metrics import MetricsWriter, flops_per_token, peak_flops_per_gpu
from megatron_align.training.optim import (
    ddp_config,
    load_optimizer_state,
    optimizer_checkpoint_metadata,
    optimizer_config,
    prepare_load_template,
    use_distributed_optimizer,
)
from megatron_align.training.profiling import section

log = logging.getLogger(__name__)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses -> (sum, token count, reporting pair); the schedule divides by tokens and microbatches."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


class Trainer:
    def __init__(self, config: RootConfig, layout: Layout, callbacks: list[Callback] | None = None) -> None:
        self.config = config
        self.layout = layout
        self.rank = torch.distributed.get_rank()
        self.cuda = torch.cuda.is_available()
        self.run_dir = config.run_dir
        self.ckpt_dir = config.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.callbacks = CallbackList(list(callbacks or []))
        self.step = 0
        self.consumed_samples = 0
        self._stop_reason: str | None = None
        self._skip_reason: str | None = None
        self.exit_code: int | None = None  # the rank's verdict (resilience.protocol.exit_codes), set by stop()
        self._data_seconds = 0.0
        t = config.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * layout.data)

        dp_rank = parallel_state.get_data_parallel_rank()
        self.data = TrainData(config, t.steps * t.global_batch_size, dp_rank, layout.data,
                              config.data.cache_dir or os.path.join(self.run_dir, "data_cache"))
        self.vocab_size = self.data.vocab_size
        if self.data.tokenizer.vocab_size > self.vocab_size:
            raise UserError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's {self.data.tokenizer.vocab_size}"
            )
        self.padded_vocab_size = padded_vocab_size(
            self.vocab_size, config.model.make_vocab_size_divisible_by, layout.tensor
        )

        chunks = build_model_chunks(config, self.vocab_size)
        self.model_inputs = ModelInputs(attention_path(config, resolve_spec(config)), self.data.tokenizer.eod)
        self.pipeline_shape = self.model_inputs.pipeline_shape(config.model.seq_length, t.micro_batch_size)
        # TE's THD attention under CP: every document a multiple of 2 x cp tokens (x tp: sequence parallelism
        # splits each rank's part again)
        self._thd_pad_multiple = 2 * layout.context * (layout.tensor if config.parallel.sequence_parallel else 1)
        self.transformer_config = tconfig = chunks[0].config
        self.use_dist_opt = use_dist_opt = use_distributed_optimizer(config, self.cuda)
        ddp = ddp_config(config, self.cuda, use_dist_opt)
        self.model = [
            DistributedDataParallel(tconfig, ddp, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)
        ]
        tconfig.finalize_model_grads_func = finalize_model_grads
        if ddp.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        precision = resolve_precision(config)
        self.optimizer = get_megatron_optimizer(
            optimizer_config(config.optimizer, precision, tconfig.params_dtype, use_dist_opt), self.model
        )
        self._schedule, notes = resolve_schedule(config.optimizer, t.steps)
        for note in notes if self.rank == 0 else []:
            log.warning("%s", note)
        self.scheduler = OptimizerParamScheduler(self.optimizer, **self._schedule)
        async_save = resolve_tristate(config.checkpoint.async_save, self.cuda)
        self.checkpoints = CheckpointManager(
            self.ckpt_dir, config.checkpoint.keep_last, config.checkpoint.keep_every, async_save,
            dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            async_writer_choice=config.checkpoint.async_writer,
            megatron_lm_tracker=config.checkpoint.format == "megatron_lm")
        self.metrics = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), enabled=self.rank == 0)
        self.flops_per_step = (
            flops_per_token(config, self.padded_vocab_size, run_attention_span(config))
            * t.global_batch_size * config.model.seq_length
        )
        self.peak_flops = peak_flops_per_gpu(precision) if self.cuda else None
        self.forward_backward = get_forward_backward_func()

    # -- state ----------------------------------------------------------------------------------
    def _layout_key(self) -> dict:
        return {"tensor": self.layout.tensor, "pipeline": self.layout.pipeline, "context": self.layout.context,
                "virtual_pipeline": self.layout.virtual_pipeline or 1, "data": self.layout.data}

    def _rng_state(self) -> dict:
        return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])

    def _model_sharded_state_dict(self, metadata: dict | None) -> dict:
        # The unwrapped GPTModel (not the DDP wrapper) owns the keys, so checkpoints do not depend on wrapping.
        if len(self.model) == 1:
            return {"model": self.model[0].module.sharded_state_dict(metadata=metadata)}
        return {f"model{i}": m.module.sharded_state_dict(metadata=metadata) for i, m in enumerate(self.model)}

    def _sharded_state_dict(self, with_optimizer: bool, with_rng: bool, is_loading: bool,
                            megatron_lm: bool = False) -> dict:
        """Our checkpoint's state; ``megatron_lm``: in Megatron-LM's envelope too (:mod:`.megatron_lm_state`)."""
        metadata = mlm_state.sharded_metadata(self) if megatron_lm else None
        state = self._model_sharded_state_dict(metadata)
        if with_optimizer:
            if is_loading:
                prepare_load_template(self.optimizer)
            # The DistributedOptimizer's own format (dp_reshardable: what runs without TE/apex) wins over the
            # Megatron-LM envelope's default.
            optimizer_metadata = {**(metadata or {}), **(optimizer_checkpoint_metadata(self.use_dist_opt) or {})}
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=is_loading, metadata=optimizer_metadata or None)
            state["scheduler"] = self.scheduler.state_dict()
            state["callbacks"] = self.callbacks.state_dict()
        if with_rng and megatron_lm:
            state["rng_state"] = mlm_state.rng_object(self, mlm.rng_to_megatron_lm(self._rng_state()))
        elif with_rng:
            pp, tp, dp = (
                parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_data_parallel_rank(with_context_parallel=True),
            )
            state["rng_state"] = ShardedObject(
                "rng_state",
                self._rng_state(),
                (self.layout.pipeline, self.layout.tensor, self.layout.data * self.layout.context),
                (pp, tp, dp),
                replica_id=0,
            )
        state["step"] = self.step
        state["consumed_samples"] = self.consumed_samples
        if megatron_lm and not is_loading:
            state.update(mlm_state.envelope(self))
        return state

    def save_checkpoint(self) -> None:
        started = time.time()
        marker = {"consumed_samples": self.consumed_samples, "layout": self._layout_key(),
                  "data": self.data.state_dict(self.consumed_samples), "tokenizer": self.data.tokenizer.identity,
                  "config": config_to_dict(self.config), "megatron_align_version": _version(),
                  "format": self.config.checkpoint.format}
        megatron_lm = self.config.checkpoint.format == "megatron_lm"
        with section("checkpoint"):
            self.checkpoints.save(self.step, self._sharded_state_dict(True, True, False, megatron_lm), marker)
        self.callbacks.on_section(self, "checkpoint", time.time() - started)
        self.callbacks.on_checkpoint_saved(self, self.step)

    def maybe_resume(self) -> None:
        """Resume from this run's newest complete checkpoint, else from checkpoint.load, else start fresh."""
        cfg = self.config.checkpoint
        path = resolve_checkpoint(self.ckpt_dir)
        own = path is not None
        if path is None and mlm.is_megatron_lm(cfg.load):
            mlm_state.load(self, cfg.load)
            return
        if path is None and cfg.load:
            path = resolve_checkpoint(cfg.load)
            if path is None:
                raise UserError(
                    f"checkpoint.load={cfg.load}: no complete checkpoint there "
                    f"(expected iter_* dirs with {'megatron_align.json'})"
                )
        if path is None:
            return
        marker = read_marker(path)
        full = own or cfg.load_optimizer
        same_layout = marker.get("layout") == self._layout_key()
        megatron_lm = marker.get("format") == "megatron_lm"

        def load_model(state: dict) -> None:
            for i, m in enumerate(self.model):
                m.module.load_state_dict(state["model" if len(self.model) == 1 else f"model{i}"])

        state = self.checkpoints.load(path, self._sharded_state_dict(full, full and same_layout, True, megatron_lm),
                                      load_model)
        if not full:
            log.info(
                "loaded weights from %s (step %s); optimizer and data position start fresh", path, marker.get("step")
            )
            return
        self.data.check_resume(marker.get("data", {}), path)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self._load_scheduler(state["scheduler"], path)
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        if same_layout:
            rng = state["rng_state"]
            self._set_rng_state(mlm.rng_from_megatron_lm(rng, 0) if megatron_lm else rng)
        else:
            log.warning(
                "checkpoint layout %s differs from %s: RNG states reseeded", marker.get("layout"), self._layout_key()
            )
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, self.consumed_samples)

    def _load_scheduler(self, saved: dict, path: str) -> None:
        """The checkpoint's step count; the schedule itself from this config (logged)
        unless override_scheduler=false."""
        changes = schedule_changes(saved, self._schedule)
        if changes and not self.config.optimizer.override_scheduler:
            raise UserError(f"checkpoint {path} was trained with another LR schedule ({'; '.join(changes)}); "
                            "restore those values, or set optimizer.override_scheduler=true to follow this config")
        self.scheduler.override_opt_param_scheduler = bool(changes)
        self.scheduler.use_checkpoint_opt_param_scheduler = not changes
        self.scheduler.load_state_dict(saved)
        if changes and self.rank == 0:
            log.warning("LR schedule follows this config, not checkpoint %s (optimizer.override_scheduler=true): %s",
                        path, "; ".join(changes))

    # -- loop -----------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        started = time.time()
        with section("data"):
            batch = next(data_iterator)
        self._data_seconds += time.time() - started
        device = torch.cuda.current_device() if self.cuda else "cpu"
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        if self.layout.context > 1 and self.model_inputs.path == "thd":  # split per document, after packing
            inputs, loss_mask = self.model_inputs.thd_context_parallel(
                tokens, labels, position_ids, loss_mask, self.layout.context,
                parallel_state.get_context_parallel_rank(), self._thd_pad_multiple)
            return model(**inputs), partial(_loss_func, loss_mask)
        if self.layout.context > 1:
            cp = batch_on_this_cp_rank(
                {"tokens": tokens, "labels": labels, "position_ids": position_ids, "loss_mask": loss_mask}
            )
            tokens, labels, position_ids, loss_mask = cp["tokens"], cp["labels"], cp["position_ids"], cp["loss_mask"]
        output = model(**self.model_inputs(tokens, labels, position_ids))
        return output, partial(_loss_func, loss_mask)

    def evaluate_loss(self, make_iterator, num_microbatches: int) -> float:
        """Mean token loss over microbatches from ``make_iterator()`` (one per model chunk), forward only."""
        for m in self.model:
            m.eval()
        iterators = [make_iterator() for _ in self.model]
        try:
            with torch.no_grad():
                losses = self.forward_backward(
                    forward_step_func=self._forward_step,
                    data_iterator=iterators[0] if len(iterators) == 1 else iterators,
                    model=self.model,
                    num_microbatches=num_microbatches,
                    seq_length=self.pipeline_shape[0],
                    micro_batch_size=self.pipeline_shape[1],
                    decoder_seq_length=self.pipeline_shape[0],
                    forward_only=True,
                )
        finally:
            for m in self.model:
                m.train()
        loss, _ = self._reduce_step(losses, stop_vote=False)  # the stop vote rides on the train step's reduce only
        return loss

    def stop(self, reason: str, exit_code: int | None = None) -> None:
        """Checkpoint and stop after the current step, on every rank (this rank's vote reaches the others in the
        step's all-reduce). ``exit_code`` is the rank's verdict for the supervisor (the first one wins; none:
        exit 0). Callbacks and the signal handlers call this."""
        self._stop_reason = self._stop_reason or reason
        if self.exit_code is None:
            self.exit_code = exit_code

    def _reduce_step(self, losses_reduced: list[dict], stop_vote: bool) -> tuple[float, bool]:
        """One world all-reduce: [loss sum, tokens, stop votes]; loss from last-stage TP-rank-0 ranks only."""
        values = torch.zeros(3, dtype=torch.float64)
        if (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            for item in losses_reduced:
                values[:2] += item["lm loss"].double().cpu()
        values[2] = 1.0 if stop_vote else 0.0
        if self.cuda:
            values = values.cuda()
        torch.distributed.all_reduce(values)
        values = values.cpu()
        return float(values[0] / values[1]), bool(values[2] > 0)

    def skip_current_step(self, reason: str) -> None:
        """From ``on_loss``: discard this step's gradients (no optimizer/LR update). Decide identically on all ranks."""
        self._skip_reason = reason

    def train_step(self, data_iterators) -> tuple[float, float, bool]:
        """Forward/backward over all microbatches, then the update. Returns (loss, grad norm, stop requested)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._data_seconds, self._skip_reason = 0.0, None
        started = time.time()
        with section("forward_backward"):
            losses = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=data_iterators, model=self.model,
                num_microbatches=self.num_microbatches, seq_length=self.pipeline_shape[0],
                micro_batch_size=self.pipeline_shape[1], decoder_seq_length=self.pipeline_shape[0], forward_only=False)
        self.callbacks.on_section(self, "data", self._data_seconds)
        self.callbacks.on_section(self, "forward_backward", time.time() - started - self._data_seconds)
        loss, stop = self._reduce_step(losses, stop_vote=self._stop_reason is not None)
        # Every rank sees the same all-reduced loss, so callbacks decide skip/stop identically everywhere.
        self.callbacks.on_loss(self, self.step + 1, loss)
        if self._skip_reason:
            return loss, float("nan"), stop or self._stop_reason is not None
        started = time.time()
        with section("optimizer"):
            update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        self.callbacks.on_section(self, "optimizer", time.time() - started)
        return loss, float(grad_norm) if grad_norm is not None else float("nan"), stop or self._stop_reason is not None

    def run_step(self, data_iterators, last: int) -> tuple[dict, bool]:
        """One optimizer step with its bookkeeping: callbacks, counters, metrics record, console line."""
        t, cfg = self.config.train, self.config
        step_started = time.time()
        self.callbacks.on_step_start(self, self.step + 1)
        loss, grad_norm, stop = self.train_step(data_iterators)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        self.checkpoints.finalize(blocking=False)
        step_time = time.time() - step_started
        record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "consumed_samples": self.consumed_samples, "tokens": self.consumed_samples * cfg.model.seq_length,
                  "step_time_s": step_time, "tokens_per_s": t.global_batch_size * cfg.model.seq_length / step_time}
        if self._skip_reason:
            record["skipped_step"] = self._skip_reason
        if self.peak_flops:
            tflops = self.flops_per_step / step_time / self.layout.world_size / 1e12
            record.update(tflops_per_gpu=tflops, mfu=tflops * 1e12 / self.peak_flops)
        record.update(self.data.step_metrics(self.consumed_samples))
        self.callbacks.on_step_end(self, self.step, record)
        if self.step % cfg.logging.interval == 0 or self.step == last:
            self.metrics.write(record)
            if self.rank == 0:
                log.info("step %d/%d | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | %.2f s/step", self.step, t.steps,
                         loss, record["lr"], grad_norm, record["tokens_per_s"], step_time)
        return record, stop

    def data_iterators(self):
        iterators = [self.data.microbatches(self.consumed_samples) for _ in self.model]
        return iterators[0] if len(iterators) == 1 else iterators

    def train(self) -> str:
        """Run to train.steps (or train.stop_at_step, or a stop request). Returns why it stopped."""
        try:
            return self._train()
        except BaseException as err:  # callbacks record the failure (trackers mark the run FAILED), then it propagates
            self.callbacks.on_error(self, err)
            raise

    def _train(self) -> str:
        t, cfg = self.config.train, self.config
        self.maybe_resume()
        self.callbacks.on_train_start(self)
        for m in self.model:
            m.train()
        data_iterators = self.data_iterators()
        start_step = self.step
        last = min(t.steps, t.stop_at_step or t.steps)
        reason = "completed" if self.step >= t.steps else "stopped"
        while self.step < last:
            _, stop = self.run_step(data_iterators, last)
            interval = cfg.checkpoint.interval
            if stop:
                reason = f"stop requested ({self._stop_reason or 'by another rank'})"
                break
            if self.step < last and interval and self.step % interval == 0:
                self.save_checkpoint()
        else:
            reason = "completed" if self.step >= t.steps else f"stopped at train.stop_at_step={t.stop_at_step}"
        if self.step > start_step and self.checkpoints.last_saved_step != self.step:
            self.save_checkpoint()
        self.checkpoints.close()
        self.callbacks.on_train_end(self)
        return reason


def _version() -> str:
    from megatron_align import __version__

    return __version__
