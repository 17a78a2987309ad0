"""ds_zo's configuration: the optimizer block and the "zero_order" section of ds_config.json.

Both are validated with DeepSpeed's own pydantic base (unknown keys are errors). `split_config` separates what ds_zo
owns from what DeepSpeed's engine should see and rejects DeepSpeed settings that have no meaning for a ZO engine, with
an error that names the field, the value and what is allowed.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Literal

from pydantic import Field, ValidationError
from deepspeed.runtime.config_utils import DeepSpeedConfigModel

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
    num_perturbations: int = Field(1, ge=1)
    trainable: list[str] = Field(default_factory=list)   # fnmatch patterns on parameter names; empty = all
    fuse_update: bool = True                            # apply step t's update inside step t+1's forward


def _pydantic_error(section: str, err: ValidationError) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        value = e.get("input")
        lines.append(f"{section}.{loc}: {e['msg']} (got {value!r})")
    return ConfigError("invalid ds_config: " + "; ".join(lines))


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


def split_config(config: dict) -> tuple[dict, ZOSGDParams, ZeroOrderConfig]:
    """(config for DeepSpeedEngine, optimizer params, zero_order section)."""
    ds = copy.deepcopy(config)
    zo_raw = ds.pop("zero_order", {})
    if not isinstance(zo_raw, dict):
        raise ConfigError(f"zero_order: must be an object, got {type(zo_raw).__name__}")
    try:
        zo = ZeroOrderConfig(**zo_raw)
    except ValidationError as e:
        raise _pydantic_error("zero_order", e) from None

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
    try:
        params = ZOSGDParams(**(opt.get("params") or {}))
    except ValidationError as e:
        raise _pydantic_error("optimizer.params", e) from None

    clip = ds.get("gradient_clipping", 0.0)
    if clip not in (0, 0.0):
        raise ConfigError(f"gradient_clipping: {clip!r} has no meaning for zeroth-order training (there are no "
                          "gradients); remove it or set 0")
    ds["gradient_clipping"] = 0.0  # DeepSpeed's default (1.0) would try to clip gradients that never exist

    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage != 0:
        raise ConfigError(f"zero_optimization.stage: {stage!r} is not supported yet; ZO keeps no gradients or "
                          "optimizer state to partition, so only stage 0 is allowed")
    for key in ("offload_param", "offload_optimizer"):
        if key in zero and (zero[key] or {}).get("device", "none") != "none":
            raise ConfigError(f"zero_optimization.{key}: offloading is not supported yet; allowed device: 'none'")
    if (ds.get("fp16") or {}).get("enabled", False):
        from deepspeed.accelerator import get_accelerator
        if not get_accelerator().is_fp16_supported():
            raise ConfigError("fp16.enabled: true is not supported on this accelerator; use bf16 or fp32")
    return ds, params, zo
