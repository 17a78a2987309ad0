"""Bad configs fail with errors that name the field, the value and what is allowed."""
import torch

import pytest

import ds_zo
from ds_zo.config import ConfigError, load_config, split_config
from conftest import ds_config
from models import tiny_model


def _err(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        split_config(cfg)
    return str(e.value)


def _with(**changes):
    cfg = ds_config()
    for path, value in changes.items():
        node = cfg
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


@pytest.mark.parametrize("changes, must_mention", [
    ({"zero_order__sedd": 1}, ["unknown key zero_order.sedd (allowed in zero_order: [", "'seed'"]),
    # a key named "strict" was taken by DeepSpeed's config base as its own argument (a TypeError); an unknown key
    # set to "auto" is unknown, not a value to give
    ({"zero_order__strict": True}, ["unknown key zero_order.strict"]),
    ({"optimizer__params__strict": True}, ["unknown key optimizer.params.strict", "'weight_decay'"]),
    ({"optimizer__params__betas": "auto"}, ["unknown key optimizer.params.betas"]),
    ({"optimizer__params": [1e-3]}, ["optimizer.params: must be an object", "list"]),
    ({"zero_order__seed": -1}, ["zero_order.seed", "-1"]),
    ({"zero_order__seed": "abc"}, ["zero_order.seed", "abc"]),
    ({"zero_order__distribution": "uniform"}, ["zero_order.distribution", "gaussian", "rademacher", "uniform"]),
    ({"zero_order__num_perturbations": 0}, ["zero_order.num_perturbations", "0"]),
    ({"zero_order__trainable": "layers"}, ["zero_order.trainable"]),
    ({"zero_order__fuse_update": "maybe"}, ["zero_order.fuse_update", "maybe"]),
    ({"zero_order__tied_z_cache": "maybe"}, ["zero_order.tied_z_cache", "maybe"]),
    ({"zero_order__fused_passes": "maybe"}, ["zero_order.fused_passes", "maybe"]),
    ({"optimizer__params__eps": 0.0}, ["optimizer.params.eps", "greater than 0"]),
    ({"optimizer__params__eps": -1e-3}, ["optimizer.params.eps"]),
    ({"optimizer__params__lr": -1.0}, ["optimizer.params.lr", "-1.0"]),
    ({"optimizer__params__weight_decay": -0.1}, ["optimizer.params.weight_decay"]),
    ({"optimizer__params__betas": [0.9, 0.99]}, ["optimizer.params.betas"]),
    ({"optimizer__type": "AdamW"}, ["optimizer.type", "AdamW", "ZOSGD"]),
    ({"optimizer__extra": 1}, ["optimizer", "extra"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping", "1.0"]),
    ({"zero_optimization__stage": 4}, ["zero_optimization.stage", "4"]),
    ({"zero_optimization__offload_param": {"device": "nvme"}}, ["zero_optimization.offload_param.device", "nvme"]),
    ({"zero_optimization__offload_param": {"device": "cpu", "buffer_count": 4}}, ["offload_param", "buffer_count"]),
    ({"zero_optimization__offload_param": {"device": "cpu", "pin_memory": "yes"}}, ["pin_memory", "yes"]),
    ({"zero_order__prefetch_depth": 0}, ["zero_order.prefetch_depth", "0"]),
    ({"zero_order__offload_dtype": "int8"}, ["zero_order.offload_dtype", "int8"]),
    ({"zero_order__overlap": "sometimes"}, ["zero_order.overlap"]),
    ({"zero_order__perturbation_parallel": 3}, ["zero_order.perturbation_parallel", "3"]),
    ({"zero_order__partition_group_size": 0}, ["zero_order.partition_group_size", "0"]),
    ({"zero_order__collective_timeout_s": 0}, ["zero_order.collective_timeout_s", "0"]),
    ({"zero_optimization__stage": 3}, ["zero_optimization.stage", "offload_param"]),
    ({"zero_optimization__offload_optimizer": {"device": "cpu"}}, ["zero_optimization.offload_optimizer"]),
    # offload settings without offload, a reslicing group without stage 3: accepted before, then ignored
    ({"zero_order__prefetch_depth": 2}, ["zero_order.prefetch_depth", "2", "offload_param.device", "off"]),
    ({"zero_order__offload_dtype": "bf16"}, ["zero_order.offload_dtype", "'bf16'", "off"]),
    ({"zero_order__overlap": False}, ["zero_order.overlap", "False"]),
    ({"zero_order__resident_units": ["lm_head"]}, ["zero_order.resident_units", "lm_head"]),
    ({"zero_order__partition_group_size": 2}, ["zero_order.partition_group_size", "2", "stage 3", "0"]),
    # HF Trainer's placeholder: DeepSpeed's own sections drop it (their defaults apply), ds_zo's refuse it (it trained
    # at lr 1e-6 unsaid before)
    ({"optimizer__params__lr": "auto"}, ["optimizer.params.lr", "'auto'", "HF Trainer's placeholder"]),
    ({"zero_order__seed": "auto"}, ["zero_order.seed", "'auto'", "give the value"]),
])
def test_bad_values_name_the_field(changes, must_mention):
    msg = _err(_with(**changes))
    for word in must_mention:
        assert word in msg, (word, msg)
    assert "give the value" not in msg or "unknown key" not in msg, msg


def test_missing_optimizer_and_wrong_section_types():
    cfg = ds_config()
    del cfg["optimizer"]
    assert "optimizer" in _err(cfg) and "ZOSGD" in _err(cfg)
    assert "zero_order" in _err({**ds_config(), "zero_order": [1]})
    assert "optimizer" in _err({**ds_config(), "optimizer": "ZOSGD"})


def test_type_is_case_insensitive_and_defaults_apply():
    cfg = ds_config()
    cfg["optimizer"] = {"type": "zosgd"}
    ds, params, zo, offload = split_config(cfg)
    assert params.lr == 1e-6 and params.eps == 1e-3 and params.weight_decay == 0.0
    assert zo.seed == 0 and zo.distribution == "gaussian" and zo.num_perturbations == 1 and zo.fuse_update
    assert "optimizer" not in ds and "zero_order" not in ds and ds["gradient_clipping"] == 0.0
    assert not offload.enabled and zo.prefetch_depth == 1 and zo.overlap and zo.offload_dtype is None


def test_deepspeeds_timers_and_flops_profiler_are_said_to_report_nothing(caplog):
    """wall_clock_breakdown and the flops profiler time DeepSpeed's forward/backward/step, which a ZO step does not go
    through: the config is taken (DeepSpeed configs carry them) with a warning that names them, not silently."""
    with caplog.at_level("WARNING"):
        split_config(ds_config())
    assert "report nothing" not in caplog.text
    with caplog.at_level("WARNING"):
        split_config({**ds_config(), "wall_clock_breakdown": True, "flops_profiler": {"enabled": True}})
    assert "wall_clock_breakdown and flops_profiler.enabled: DeepSpeed's timers and flops profiler" in caplog.text


def test_offload_is_read_from_deepspeeds_own_keys_at_stages_0_to_2():
    for stage in (0, 1, 2):
        cfg = _with(zero_optimization__stage=stage,
                    zero_optimization__offload_param={"device": "cpu", "pin_memory": False})
        ds, _, _, offload = split_config(cfg)
        assert offload.enabled and not offload.pin_memory
        assert ds["zero_optimization"] == {"stage": 0}  # DeepSpeed's engine never sees it


def test_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(arr)
    with pytest.raises(ConfigError, match="dict or a path"):
        load_config(42)


def test_initialize_rejects_bad_arguments_before_touching_the_model():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="zero_order.trainable"):
        ds_zo.initialize(model=model, config=ds_config(trainable=["no.such.*"]))
    with pytest.raises(ConfigError, match="optimizer.params.eps"):
        ds_zo.initialize(model=model, config=_with(optimizer__params__eps=0))
    with pytest.raises(ValueError, match="requires a model"):
        ds_zo.initialize(config=ds_config())
    with pytest.raises(ConfigError, match="config="):
        ds_zo.initialize(model=model)
    with pytest.raises(ValueError, match="model_parameters"):
        ds_zo.initialize(model=model, config=ds_config(), model_parameters=model.parameters())
    with pytest.raises(TypeError, match="ZOSGD"):
        ds_zo.initialize(model=model, config=ds_config(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_passed_zosgd_must_be_the_one_the_config_describes():
    """The engine perturbs with the config's eps over the zero_order.trainable parameters and replay decays the
    matrices by the step's one weight_decay: a ZOSGD passed to initialize that differs would be followed in part
    only, so it is refused with the field named; the one the config describes is used as given."""
    from ds_zo import ZOSGD
    from ds_zo.initialize import build_optimizer
    model = tiny_model("llama")
    names = {n for n, _ in model.named_parameters()}
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1)
    with pytest.raises(ConfigError, match=r"exactly the trained parameters .*missing \['model.norm.weight'"):
        ds_zo.initialize(model=model, config=cfg,
                         optimizer=build_optimizer(model, names - {"model.norm.weight"}, 1e-2, 1e-3, 0.1))
    with pytest.raises(ConfigError, match=r"optimizer.params.eps: 0.001 in the config, 0.05 in the ZOSGD"):
        ds_zo.initialize(model=model, config=cfg, optimizer=build_optimizer(model, names, 1e-2, 5e-2, 0.1))
    with pytest.raises(ConfigError, match=r"optimizer.params.weight_decay: 0.1 in the config, 0.3"):
        ds_zo.initialize(model=model, config=cfg, optimizer=build_optimizer(model, names, 1e-2, 1e-3, 0.3))
    flat = ZOSGD(list(model.parameters()), lr=1e-2, eps=1e-3, weight_decay=0.1)      # norms decayed too
    with pytest.raises(ConfigError,
                       match=r"weight_decay 0.1 on a parameter '[\w.]*norm.weight' of rank 1; ds_zo decays exactly"):
        ds_zo.initialize(model=model, config=cfg, optimizer=flat)
    # the same as the config describes: taken as given, also with only norms trained (no group decays: the config's
    # weight_decay is moot) and after a torch scheduler changed the lr it was built with
    norms = {n for n in names if "norm" in n}
    other = tiny_model("llama")
    ds_zo.initialize(model=other, config=ds_config(lr=1e-2, eps=1e-3, wd=0.1, trainable=["*norm*"]),
                     optimizer=build_optimizer(other, norms, 1e-2, 1e-3, 0.1))
    mine = build_optimizer(model, names, 1e-2, 1e-3, 0.1)
    torch.optim.lr_scheduler.LambdaLR(mine, lambda step: 0.001)
    assert mine.current_lr() == pytest.approx(1e-5)
    engine, optimizer, *_ = ds_zo.initialize(model=model, config=cfg, optimizer=mine)
    assert optimizer is mine and engine.optimizer is mine


def test_parallel_degrees_must_divide_the_world():
    from ds_zo.parallel.dims import ParallelDims
    with pytest.raises(ConfigError, match="perturbation_parallel: 2 does not divide the world size 3"):
        ParallelDims(world=3, rank=0, pertp=2)
    with pytest.raises(ConfigError, match="partition_group_size: 3 does not divide the world size 4"):
        ParallelDims(world=4, rank=0, partition=3)
    dims = ParallelDims(world=4, rank=3, pertp=2, partition=2)
    assert (dims.dp, dims.dp_rank, dims.pert_rank, dims.partition_rank) == (2, 1, 1, 1)
    assert dims.pertp_ranks(1) == [2, 3] and dims.dp_ranks(0) == [0, 2] and dims.partition_ranks(1) == [2, 3]
    # one process cannot hold a perturbation-parallel pair
    with pytest.raises(ConfigError, match="perturbation_parallel"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(perturbation_parallel=2))


def test_partition_group_must_divide_the_node(monkeypatch):
    from ds_zo.parallel.dims import default_partition_size
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_partition_size(8, None) == 4
    assert default_partition_size(8, 2) == 2
    with pytest.raises(ConfigError, match="does not divide the ranks of a node"):
        default_partition_size(8, 3)


def test_inconsistent_batch_sizes_name_the_data_parallel_degree():
    """DeepSpeed checks train_batch_size = micro × gradient_accumulation_steps × world_size with ds_zo's data-parallel
    degree as its world_size; under perturbation parallelism that read "world_size 1" on a 2-process job. The error
    now says what that world size is."""
    cfg = {**ds_config(micro=2), "gradient_accumulation_steps": 2, "train_batch_size": 8}
    with pytest.raises(ConfigError, match=r"8 != 2 \* 2 \* 1 \(DeepSpeed's world_size there is ds_zo's data-parallel "
                                          r"degree: dp = world 1 / zero_order.perturbation_parallel 1 = 1"):
        ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    # a size DeepSpeed derives with it (train_batch_size // micro // world_size) coming out 0
    with pytest.raises(ConfigError, match=r"Gradient accumulation steps: 0 has to be greater than 0 \(DeepSpeed's "
                                          r"world_size there is ds_zo's data-parallel degree"):
        ds_zo.initialize(model=tiny_model("llama"), config={**ds_config(micro=4), "train_batch_size": 2})
    # a missing batch size involves no world size: DeepSpeed's own message alone
    with pytest.raises(AssertionError, match=r"needs to be provided$"):
        cfg = ds_config()
        del cfg["train_micro_batch_size_per_gpu"]
        ds_zo.initialize(model=tiny_model("llama"), config={**cfg, "gradient_accumulation_steps": 2})
