"""ds_zo's configuration: the optimizer block and the "zero_order" section of ds_config.json.

Both are validated with DeepSpeed's own pydantic base (unknown keys are errors). `split_config` separates what ds_zo
owns from what DeepSpeed's engine should see and rejects DeepSpeed settings that have no meaning for a ZO engine, with
an error that names the field, the value and what is allowed.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from pydantic import Field, ValidationError
from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from deepspeed.utils import logger

OPTIMIZER_TYPE = "ZOSGD"


class ConfigError(ValueError):
    """A ds_config problem; the message names the field, the value and what is allowed."""


class ZOSGDParams(DeepSpeedConfigModel):
    lr: float = Field(1e-6, ge=0)
    eps: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class ZeroOrderConfig(DeepSpeedConfigModel):
    seed: int = Field(0, ge=0, lt=2**63)
    distribution: Literal["gaussian", "rademacher"] = "gaussian"
    z_sampler: Literal["auto", "philox", "chunked"] = "auto"   # how z is drawn (perturb.SAMPLERS): "auto" is the
                                                        # counter-based Triton kernel on CUDA (one launch per slice),
                                                        # torch's sampler chunk by chunk elsewhere
    num_perturbations: int = Field(1, ge=1)
    trainable: list[str] = Field(default_factory=list)   # fnmatch patterns on parameter names; empty = all
    trainable_rows: dict[str, list[int]] = Field(default_factory=dict)  # pattern -> rows: train only those rows
    fuse_update: bool = True                            # apply step t's update inside step t+1's forward
    fused_passes: bool = True                           # θ ± εz and the update computed where z is drawn (CPU:
                                                        # native sweeps; counter-based z: Triton kernels, one launch
                                                        # per unit and pass); false: passes over drawn z (same values)
    tied_z_cache: bool = False                          # keep a tied weight's ε·z from its first unit to its second
                                                        # (drawn once, not twice; costs one float32 copy of it)
    row_blocks: Literal["auto", "on", "off"] = "auto"   # embedding / output-layer units from row blocks of their
                                                        # working copies, never whole ones: "auto" and "on" on
                                                        # every device (on GPUs a block's logits round unlike the
                                                        # whole matmul's), "off" nowhere (whole copies: more
                                                        # memory, fewer launches)
    # offload (active with zero_optimization.offload_param.device = "cpu")
    prefetch_depth: int = Field(1, ge=1)                # uploads run this many units ahead of compute
    overlap: bool = True                                # separate h2d / d2h / compute CUDA streams
    offload_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None  # storage dtype of offloaded units; None = model's
    resident_units: Optional[list[str]] = None          # fnmatch patterns of unit names kept on device;
                                                        # None = every unit except the decoder layers
    # DistZO2 parallelism
    perturbation_parallel: int = Field(1, ge=1, le=2)   # ranks sharing one data shard, one sign each
    partition_group_size: Optional[int] = Field(None, ge=1)  # ZeRO-3 reslicing group; None = the ranks of a node
    collective_timeout_s: float = Field(600.0, gt=0)    # a dead or hung peer fails every collective after this
    max_consecutive_skips: int = Field(10, ge=1)        # steps with a non-finite loss in a row before aborting


@dataclass(frozen=True)
class OffloadConfig:
    enabled: bool = False
    pin_memory: bool = True
    partitioned: bool = False     # ZeRO-3: each rank's CPU master is its shard; units are resliced


def _validated(section: str, raw: dict, model):
    """raw as `model`, strictly (DeepSpeed's config base would drop "auto" values unsaid), unknown keys named with
    the allowed ones (a key named "strict" too, which the base's constructor would take as its own argument)."""
    unknown = sorted(set(raw) - set(model.model_fields))
    if unknown:
        raise ConfigError(f"invalid ds_config: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{section}.{k}' for k in unknown)} (allowed in {section}: "
                          f"{sorted(model.model_fields)})")
    try:
        return model(strict=True, **raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            value = e.get("input")
            hint = (": \"auto\" is not a value of this field (in ds_config it is HF Trainer's placeholder, filled in "
                    "by its DeepSpeed integration, which does not drive ds_zo); give the value" if value == "auto"
                    else "")
            lines.append(f"{section}.{loc}: {e['msg']} (got {value!r}){hint}")
        raise ConfigError("invalid ds_config: " + "; ".join(lines)) from None


def load_config(config: Any) -> dict:
    """A ds_config from a dict (copied) or a path to a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"ds_config file {path!r} does not exist")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"ds_config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"ds_config file {path!r} must hold a JSON object, got {type(data).__name__}")
        return data
    raise ConfigError(f"config must be a dict or a path to ds_config.json, got {type(config).__name__}")


def half_dtype(ds: dict):
    """The dtype DeepSpeed's engine casts the model's parameters to, else None: fp16 before bf16, each section read by
    DeepSpeed's own parser (its spellings, and its reading of values such as "auto")."""
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    try:
        if get_float16_config(ds).enabled:
            return torch.float16
        if get_bfloat16_config(ds).enabled:
            return torch.bfloat16
    except ValidationError as e:
        raise ConfigError(f"fp16 / bf16: {e}") from None
    return None


def split_config(config: dict) -> tuple[dict, ZOSGDParams, ZeroOrderConfig, OffloadConfig]:
    """(config for DeepSpeedEngine, optimizer params, zero_order section, parameter offload)."""
    ds = copy.deepcopy(config)
    zo_raw = ds.pop("zero_order", {})
    if not isinstance(zo_raw, dict):
        raise ConfigError(f"zero_order: must be an object, got {type(zo_raw).__name__}")
    zo = _validated("zero_order", zo_raw, ZeroOrderConfig)

    opt = ds.pop("optimizer", None)
    if opt is None:
        raise ConfigError(f"optimizer: missing; ds_zo needs {{\"optimizer\": {{\"type\": \"{OPTIMIZER_TYPE}\", "
                          f"\"params\": {{\"lr\": ..., \"eps\": ...}}}}}}")
    if not isinstance(opt, dict):
        raise ConfigError(f"optimizer: must be an object, got {type(opt).__name__}")
    unknown = set(opt) - {"type", "params"}
    if unknown:
        raise ConfigError(f"optimizer: unknown keys {sorted(unknown)}; allowed: ['params', 'type']")
    if str(opt.get("type", "")).lower() != OPTIMIZER_TYPE.lower():
        raise ConfigError(f"optimizer.type: {opt.get('type')!r} is not supported by ds_zo; use {OPTIMIZER_TYPE!r}")
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"optimizer.params: must be an object, got {type(params).__name__}")
    params = _validated("optimizer.params", params, ZOSGDParams)

    unreported = [k for k, on in (("wall_clock_breakdown", ds.get("wall_clock_breakdown")),
                                  ("flops_profiler.enabled", (ds.get("flops_profiler") or {}).get("enabled")))
                  if on]
    if unreported:
        # DeepSpeed's timers and flops profiler wrap its forward/backward/step, which a ZO step does not go through
        logger.warning("ds_zo: %s: DeepSpeed's timers and flops profiler measure its forward, backward and step, which "
                       "a ZO step (engine.train_batch) does not go through, so they report nothing; "
                       "`python -m benchmarks.run` and engine.comm_stats() measure ZO steps", " and ".join(unreported))
    clip = ds.get("gradient_clipping", 0.0)
    if clip not in (0, 0.0):
        raise ConfigError(f"gradient_clipping: {clip!r} has no meaning for zeroth-order training (there are no "
                          "gradients); remove it or set 0")
    ds["gradient_clipping"] = 0.0  # DeepSpeed's default (1.0) would try to clip gradients that never exist

    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: must be an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: {stage!r} is not allowed; use 0, 1, 2 (ZO keeps no gradients or "
                          "optimizer state, so 1 and 2 partition nothing and run as 0) or 3 (partitioned parameters)")
    opt_off = zero.get("offload_optimizer") or {}
    if opt_off.get("device", "none") != "none":
        raise ConfigError(f"zero_optimization.offload_optimizer.device: {opt_off.get('device')!r} has no meaning "
                          "for ZO (there is no optimizer state); use zero_optimization.offload_param")
    offload = _offload_param(zero, partitioned=stage == 3)
    if not offload.enabled:
        for field in ("prefetch_depth", "overlap", "offload_dtype", "resident_units"):
            value = getattr(zo, field)
            if value != ZeroOrderConfig.model_fields[field].default:
                raise ConfigError(f"zero_order.{field}: {value!r} is only used with parameter offload "
                                  "(zero_optimization.offload_param.device = 'cpu'), which is off; remove it or "
                                  "turn offload on")
    if zo.partition_group_size is not None and stage != 3:
        raise ConfigError(f"zero_order.partition_group_size: {zo.partition_group_size!r} is only used with "
                          f"zero_optimization.stage 3 (the reslicing group), and the stage is {stage!r}")
    if stage == 3 and not offload.enabled:
        raise ConfigError("zero_optimization.stage: 3 needs zero_optimization.offload_param.device = 'cpu' (each rank "
                          "keeps its shard of the parameters in CPU memory and reslices units through the device)")
    # ds_zo runs the offload itself and ZeRO's gradient/optimizer-state wrappers have nothing to manage: DeepSpeed's
    # engine is built at stage 0 and never sees offload_param
    if zero:
        ds["zero_optimization"] = {**{k: v for k, v in zero.items() if k != "offload_param"}, "stage": 0}
    if half_dtype(ds) == torch.float16:
        from deepspeed.accelerator import get_accelerator
        if not get_accelerator().is_fp16_supported():
            raise ConfigError("fp16.enabled: true is not supported on this accelerator; use bf16 or fp32")
    return ds, params, zo, offload


def _offload_param(zero: dict, partitioned: bool) -> OffloadConfig:
    off = zero.get("offload_param")
    if off is None:
        return OffloadConfig()
    if not isinstance(off, dict):
        raise ConfigError(f"zero_optimization.offload_param: must be an object, got {type(off).__name__}")
    unknown = set(off) - {"device", "pin_memory"}
    if unknown:
        raise ConfigError(f"zero_optimization.offload_param: keys {sorted(unknown)} are not used by ds_zo; allowed: "
                          "['device', 'pin_memory'] (the prefetch window is zero_order.prefetch_depth)")
    device = off.get("device", "none")
    if device not in ("cpu", "none", None):
        raise ConfigError(f"zero_optimization.offload_param.device: {device!r} is not supported; allowed: 'cpu', 'none'")
    pin = off.get("pin_memory", True)
    if not isinstance(pin, bool):
        raise ConfigError(f"zero_optimization.offload_param.pin_memory: {pin!r} must be true or false")
    return OffloadConfig(enabled=device == "cpu", pin_memory=pin, partitioned=partitioned)
