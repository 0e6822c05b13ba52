"""Megatron-LM's own checkpointing code driving a tiny GPT on CPU gloo ranks: the reference the tests compare with.

Run as a script (its ranks are spawned processes, and Megatron-LM's async writer starts a spawned Manager, hence
the ``__main__`` guard):

- ``save DIR OUT``: args from ``megatron.training.arguments`` (parse_args + validate_args), a GPTModel built by
  Megatron-Core from ``core_transformer_config_from_args``, DDP, optimizer and scheduler as ``pretrain_gpt.py``
  builds them; two training steps on fixed tokens; ``save_checkpoint`` into DIR; rank 0 writes the logits of the
  saved model on fixed tokens to OUT (a torch file).
- ``resume DIR OUT CONFIG_YAML``: Megatron-LM's ``load_checkpoint`` (args from the checkpoint,
  ``--use-checkpoint-args``) into a freshly built model + optimizer + scheduler, then two training steps on the
  batches this project's data pipeline serves at the checkpoint's consumed samples; OUT gets their losses.

Only megatron-core >= 0.17 wheels ship ``megatron.training``; the tests skip on older stacks.
"""

from __future__ import annotations

import os
import sys
from functools import partial

WORLD = 2
SEED = 1234
MODEL_ARGS = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--rotary-base", "10000", "--normalization", "RMSNorm", "--norm-epsilon",
    "1e-5", "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--vocab-size", "512", "--make-vocab-size-divisible-by", "128", "--tokenizer-type", "NullTokenizer",
]
CPU_ARGS = ["--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
            "--attention-backend", "unfused"]
"""Fused kernels need CUDA/TE; how one runs Megatron-LM on CPU (command-line flags, not checkpoint args)."""
SCHEDULE_ARGS = ("lr", "min_lr", "train_iters", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style",
                 "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay",
                 "weight_decay_incr_style", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "global_batch_size",
                 "seed")
RUN_ARGS = [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "8", "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1",
    "--seed", str(SEED), "--save-interval", "1000", "--ckpt-format", "torch_dist",
    "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", *CPU_ARGS,
]


def _init(rank: int, port: int, argv: list[str]):
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.training import arguments, global_vars

    from megatron_align.parallel import cpu

    cpu.activate()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    sys.argv = ["pretrain_gpt.py", *argv]
    args = arguments.parse_args()
    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        load_args_from_checkpoint(args)
        # Megatron-LM takes model and layout from the checkpoint, not the schedule: a user passes the same
        # --lr/--train-iters/... again; here they come from the args the checkpoint carries.
        from megatron_align.convert.megatron_lm import open_checkpoint

        saved = open_checkpoint(args.load).args
        for name in SCHEDULE_ARGS:
            setattr(args, name, getattr(saved, name))
    arguments.validate_args(args)
    global_vars.set_args(args)
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    init_num_microbatches_calculator(rank, args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
                                     args.data_parallel_size)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    mpu.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    # As initialize_megatron does: the same CPU seed on every DP replica (so they build the same weights: Megatron
    # DDP does not broadcast them), and the model-parallel RNG tracker, which _set_random_seed seeds only with CUDA.
    from megatron.training.initialize import _set_random_seed

    _set_random_seed(args.seed, args.data_parallel_random_init)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed + 100 * mpu.get_pipeline_model_parallel_rank())
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    if getattr(args, "padded_vocab_size", None) is None:  # a resume has it from the checkpoint's args
        args.padded_vocab_size = calculate_padded_vocab_size(
            args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size, logging_enabled=False)
    return args


def _build(args):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.training import (
        get_megatron_ddp_config,
        get_megatron_optimizer_config,
        get_optimizer_param_scheduler,
    )

    config = core_transformer_config_from_args(args)
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm",
                                                                       qk_layernorm=args.qk_layernorm),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling)
    ddp = DistributedDataParallel(config, get_megatron_ddp_config(args), model)
    config.finalize_model_grads_func = finalize_model_grads
    opt_config, overrides = get_megatron_optimizer_config(args)
    optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides=overrides)
    return [ddp], optimizer, get_optimizer_param_scheduler(optimizer)


def _loss(loss_mask, output):
    import torch

    losses = output.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss, batch["loss_mask"])


def _train_step(args, model, optimizer, scheduler, microbatches) -> float:
    """One step as Megatron-LM's train_step does it; the loss all-reduced over the world (last stage only)."""
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(microbatches), model=model,
        num_microbatches=len(microbatches), seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length, forward_only=False)
    update_ok, _, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=args.global_batch_size)
    values = torch.zeros(2, dtype=torch.float64)
    if mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0:
        for item in losses:
            values += item["lm loss"].double()
    torch.distributed.all_reduce(values)
    return float(values[0] / values[1])


def fixed_tokens(batch: int = 2, seq: int = 64, seed: int = 5):
    import torch

    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _fixed_microbatches(args, step: int):
    import torch
    from megatron.core import parallel_state as mpu

    num = args.global_batch_size // (args.micro_batch_size * mpu.get_data_parallel_world_size())
    out = []
    for i in range(num):
        tokens = fixed_tokens(1, args.seq_length + 1, seed=100 * step + 10 * mpu.get_data_parallel_rank() + i)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, args.seq_length),
                    "position_ids": torch.arange(args.seq_length).unsqueeze(0)})
    return out


def save(rank: int, port: int, ckpt_dir: str, out: str, extra: list[str]) -> None:
    import torch
    from megatron.training.checkpointing import save_checkpoint

    args = _init(rank, port, MODEL_ARGS + RUN_ARGS + ["--save", ckpt_dir, *extra])
    model, optimizer, scheduler = _build(args)
    for step in (1, 2):
        _train_step(args, model, optimizer, scheduler, _fixed_microbatches(args, step))
        args.consumed_train_samples = step * args.global_batch_size
    save_checkpoint(2, model, optimizer, scheduler, num_floating_point_operations_so_far=1.5e9)
    if rank == 0 and args.tensor_model_parallel_size == 1 and args.pipeline_model_parallel_size == 1:
        gpt = model[0].module
        gpt.eval()
        with torch.no_grad():
            tokens = fixed_tokens()
            logits = gpt(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)
        torch.save({"tokens": tokens, "logits": logits.float()}, out)
    torch.distributed.barrier()


def resume(rank: int, port: int, ckpt_dir: str, out: str, config_yaml: str) -> None:
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.training.checkpointing import load_checkpoint

    from megatron_align.config.loader import load_config
    from megatron_align.data.loader import TrainData

    args = _init(rank, port, ["--load", ckpt_dir, "--use-checkpoint-args", "--ckpt-format", "torch_dist",
                              "--transformer-impl", "local", "--use-cpu-initialization",
                              "--no-gradient-accumulation-fusion", "--micro-batch-size", "1",
                              "--tokenizer-type", "NullTokenizer", "--exit-on-missing-checkpoint",
                              *CPU_ARGS])
    model, optimizer, scheduler = _build(args)
    iteration, _ = load_checkpoint(model, optimizer, scheduler)
    config = load_config(config_yaml)
    data = TrainData(config, args.train_iters * args.global_batch_size, mpu.get_data_parallel_rank(),
                     mpu.get_data_parallel_world_size(), config.data.cache_dir or os.path.join(config.run_dir,
                                                                                                "data_cache"))
    num = args.global_batch_size // (args.micro_batch_size * mpu.get_data_parallel_world_size())
    batches = data.microbatches(args.consumed_train_samples)
    losses = []
    for _ in range(2):
        microbatches = [next(batches) for _ in range(num)]
        losses.append(_train_step(args, model, optimizer, scheduler, microbatches))
    if rank == 0:
        torch.save({"iteration": iteration, "consumed_train_samples": args.consumed_train_samples,
                    "losses": losses, "lr": optimizer.param_groups[0]["lr"]}, out)
    torch.distributed.barrier()


def _rank_main(rank: int, port: int, mode: str, rest: list[str]) -> None:
    try:
        if mode == "save":
            save(rank, port, rest[0], rest[1], rest[2:])
        else:
            resume(rank, port, *rest)
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    from megatron_align.parallel.spawn import free_port

    mp.start_processes(_rank_main, args=(free_port(), sys.argv[1], sys.argv[2:]), nprocs=WORLD,
                       start_method="spawn")
