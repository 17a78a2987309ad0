"""ds_zo.initialize: the ZO counterpart of deepspeed.initialize, with the same arguments and return values."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from torch import nn

from .config import ConfigError, half_dtype, load_config, split_config
from .model.units import is_decayed, resolve_rows, resolve_trainable
from .optimizer import ZOSGD
from .parallel import Communicator, ParallelDims
from .parallel.dims import default_partition_size
from .parallel.launch_env import ensure_launch_env
from .parallel.mpu import ZOParallelMPU
from .parallel.partition import partition_model, replicate_from_rank0
from .parallel.communicator import agree_on_settings, startup_barrier, startup_device
from .parallel.shm_segments import deepspeed_shm_op_loaded, release_shm_segment
from .weights_fingerprint import rank0s, weight_fingerprint


def build_optimizer(model: nn.Module, trainable: set[str], lr: float, eps: float, weight_decay: float) -> ZOSGD:
    """ZOSGD over the trainable parameters: a decayed group (rank >= 2) and a non-decayed one (biases, norms)."""
    named = [(n, p) for n, p in model.named_parameters() if n in trainable]
    if not named:
        raise ConfigError("zero_order.trainable: no parameter of the model matches; nothing would be trained")
    groups = [{"params": [p for _, p in named if is_decayed(p)], "weight_decay": weight_decay},
              {"params": [p for _, p in named if not is_decayed(p)], "weight_decay": 0.0}]  # (ZeRO-3: by ds_shape)
    return ZOSGD([g for g in groups if g["params"]], lr=lr, eps=eps, weight_decay=weight_decay)


def check_client_optimizer(optimizer: ZOSGD, model: nn.Module, trainable: set[str], zo_params) -> None:
    """A ZOSGD passed to initialize must be the one the config describes: the engine perturbs with the config's eps,
    trains exactly the zero_order.trainable parameters, and replay decays the matrices (rank >= 2) by the one
    weight_decay a step records; an optimizer that differs would be followed in part only."""
    named = {id(p): n for n, p in model.named_parameters()}
    try:
        optimizer.check_decay_groups(named)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    want = {id(p) for n, p in model.named_parameters() if n in trainable}
    if have != want:
        extra = sorted(named.get(i, "<not a parameter of the model>") for i in have - want)
        missing = sorted(named[i] for i in want - have)
        raise ConfigError(f"optimizer: the ZOSGD passed to ds_zo.initialize must hold exactly the trained parameters "
                          f"(zero_order.trainable); extra {extra[:5]}, missing {missing[:5]}")
    # lr as set (a torch scheduler built on the optimizer may have changed it already; it keeps it as initial_lr);
    # weight_decay only where a trained parameter decays (else the groups hold none and the config's is moot)
    lrs = {g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
    decays = any(is_decayed(p) for g in optimizer.param_groups for p in g["params"])
    checked = [("lr", lrs.pop() if len(lrs) == 1 else sorted(lrs)), ("eps", optimizer.eps)]
    if decays:
        checked.append(("weight_decay", optimizer.weight_decay()))
    for field, value in checked:
        if value != getattr(zo_params, field):
            raise ConfigError(f"optimizer.params.{field}: {getattr(zo_params, field)!r} in the config, {value!r} in the "
                              f"ZOSGD passed to ds_zo.initialize; they must agree")


def refuse_non_causal_lm(model: nn.Module, loss_fn) -> None:
    """ds_zo trains decoder-only language models: the ZO forward runs the model on input_ids with one row block per
    slot, and the default loss is the token cross-entropy over (rows, T, vocab) logits."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"ds_zo.initialize: {type(model).__name__} is an encoder-decoder model, which ds_zo's ZO "
                         "forward does not run (it trains decoder-only causal language models, ...ForCausalLM)")
    head = getattr(model, "get_output_embeddings", None)
    if loss_fn is None and callable(head) and head() is None:
        raise ValueError(f"ds_zo.initialize: {type(model).__name__} has no language-model head "
                         "(get_output_embeddings() is None), and the default loss is the token cross-entropy over "
                         "its (rows, T, vocab) logits: pass a ...ForCausalLM model, or loss_fn=(logits, labels) -> "
                         "(sum of per-item losses, item count)")


def initialize(args: Any = None, model: Optional[nn.Module] = None, optimizer: Optional[ZOSGD] = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               mpu: Any = None, dist_init_required: Optional[bool] = None, collate_fn: Any = None,
               config: Any = None, config_params: Any = None, loss_fn: Any = None):
    """Build a ZOEngine. Returns (engine, optimizer, training_dataloader, lr_scheduler) like deepspeed.initialize.
    loss_fn (optional): (logits, labels) -> (sum of per-item losses, item count), e.g. ds_zo.loss.LabelWordLoss;
    default: the model's mean token cross-entropy over labels != -100."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    from .engine import ZOEngine
    from .model_hooks import attached_engine

    if model is None:
        raise ValueError("ds_zo.initialize requires a model")
    refuse_non_causal_lm(model, loss_fn)
    if attached_engine(model) is not None:
        raise ValueError("ds_zo.initialize: this model is already trained by a ds_zo engine, whose hooks apply its "
                         "updates to every forward of the model; call that engine's destroy() first, or pass a copy "
                         "(copy.deepcopy(model))")
    if config is None:
        config = config_params
    if config is None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
    if config is None:
        raise ConfigError("ds_zo.initialize needs config= (a dict or a path to ds_config.json) or --deepspeed_config")
    if model_parameters is not None:
        raise ValueError("model_parameters is not used by ds_zo: choose trainable parameters with "
                         "zero_order.trainable patterns (or requires_grad=False)")
    ds_config, zo_params, zo, offload = split_config(load_config(config))

    try:
        rows = resolve_rows(model, zo.trainable_rows)
        # rows alone: only those rows are trained; with patterns too: the patterns' parameters plus the rows
        trainable = set(rows) if rows and not zo.trainable else resolve_trainable(model, zo.trainable) | set(rows)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not trainable:       # (a pattern that matches nothing is refused by name above): every parameter is frozen
        raise ConfigError("zero_order.trainable: every parameter of the model has requires_grad=False; nothing "
                          "would be trained")
    if optimizer is not None and not isinstance(optimizer, ZOSGD):
        raise TypeError(f"ds_zo.initialize: optimizer must be a ds_zo.ZOSGD (or None), got {type(optimizer).__name__}")
    if optimizer is not None:
        check_client_optimizer(optimizer, model, trainable, zo_params)

    if mpu is not None:
        raise ValueError("mpu is not used by ds_zo: its parallel layout comes from zero_order.perturbation_parallel "
                         "and the world size")
    ensure_launch_env()
    if get_accelerator().device_name() != "cpu":
        # this rank's device, as DeepSpeed's engine sets it, but before the start-up collectives: under NCCL they
        # stage host tensors on the current device, which was device 0 on every rank of a node until the engine
        device_rank = getattr(args, "device_rank", None)
        get_accelerator().set_device(device_rank if device_rank is not None else int(os.environ["LOCAL_RANK"]))
    partition_parameters.shutdown_init_context()
    try:
        from datetime import timedelta
        # auto_mpi_discovery off: ensure_launch_env has set every variable (or refused); DeepSpeed's discovery,
        # run where one was missing, made each process a job of its own (rank 0 of 1) under a singleton MPI
        dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False,
                              dist_init_required=dist_init_required, timeout=timedelta(seconds=zo.collective_timeout_s))
        world, rank = dist.get_world_size(), dist.get_rank()
        # DeepSpeed would leave 66 MiB of /dev/shm per rank; released before anything here can fail
        release_shm_segment(rank, world, lambda: startup_barrier(rank, world, zo.collective_timeout_s),
                            deepspeed_shm_op_loaded())
        partition = default_partition_size(world, zo.partition_group_size) if offload.partitioned else 1
        agree_on_settings(rank, world, zo.collective_timeout_s, {
            "zero_order": zo.model_dump(), "optimizer.params": zo_params.model_dump(),
            "ZeRO / offload": [ds_config.get("zero_optimization"), dataclasses.asdict(offload), partition],
            "batch sizes": [ds_config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                       "gradient_accumulation_steps")],
            "fp16 / bf16": str(half_dtype(ds_config)),
            "model (parameter names, shapes, dtypes)": [(n, list(p.shape), str(p.dtype))
                                                        for n, p in model.named_parameters()],
            "trainable parameters": [sorted(trainable), {n: r.tolist() for n, r in rows.items()}],
        }, startup_device())
        dims = ParallelDims(world=world, rank=rank, pertp=zo.perturbation_parallel, partition=partition)
        dims.build_groups(zo.collective_timeout_s)
        comm = Communicator(dims, zo.collective_timeout_s)
        # the weights the run starts from (checkpoints record them; resume and replay compare): every rank holds
        # the full model until ZeRO-3 partitions it, and rank 0's once it is broadcast; taken in the dtype
        # DeepSpeed's engine will cast the parameters to, the one the run trains in
        cast = half_dtype(ds_config)
        if offload.partitioned:
            base_weights = rank0s(weight_fingerprint(model, cast), comm)
            partition_model(model, comm, ds_config)
        else:
            if world > 1:
                replicate_from_rank0(model, comm)
            base_weights = weight_fingerprint(model, cast)
        if optimizer is None:
            optimizer = build_optimizer(model, trainable, zo_params.lr, zo_params.eps, zo_params.weight_decay)
        zo_mpu = ZOParallelMPU(dims)
        try:
            config_class = DeepSpeedConfig(ds_config, zo_mpu)
        except AssertionError as e:
            # DeepSpeed's batch arithmetic takes ds_zo's data-parallel degree as its world_size (a size it derives,
            # e.g. train_batch_size // micro // world_size, comes out 0 where the degree is larger than meant)
            if "world_size" not in str(e) and "has to be greater than 0" not in str(e):
                raise
            raise ConfigError(f"{e} (DeepSpeed's world_size there is ds_zo's data-parallel degree: dp = world {world} "
                              f"/ zero_order.perturbation_parallel {dims.pertp} = {dims.dp}; the ranks of a "
                              "perturbation-parallel group score the same rows)") from None
        engine = ZOEngine(args=args, model=model, optimizer=optimizer, model_parameters=None,
                          training_data=training_data, lr_scheduler=lr_scheduler, mpu=zo_mpu,
                          dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds_config,
                          config_class=config_class, zo_config=zo, zo_params=zo_params, trainable=trainable,
                          offload=offload, dims=dims, communicator=comm, rows=rows, loss_fn=loss_fn)
        engine.base_weights, engine.half_dtype = base_weights, cast
    finally:
        partition_parameters.restore_init_context()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
