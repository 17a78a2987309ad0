"""Checkpoints: resume equals the uninterrupted run; interrupted saves, tampering and mismatches are caught."""
import json
import os

import pytest
import torch

import ds_zo
from ds_zo.checkpoint import CheckpointError
from conftest import ds_config
from models import batch, tiny_model


def _engine(arch="llama", **kw):
    cfg = ds_config(lr=1e-2, wd=0.1, seed=4, **kw)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-2,
                                                       "warmup_num_steps": 5}}
    engine, *_ = ds_zo.initialize(model=tiny_model(arch, tied=False), config=cfg)
    return engine


def _make(offload: bool):
    cfg = ds_config(lr=1e-2, wd=0.1, seed=4)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-2,
                                                       "warmup_num_steps": 5}}
    if offload:
        cfg["zero_optimization"] = {"offload_param": {"device": "cpu"}}
    return ds_zo.initialize(model=tiny_model("llama", tied=False), config=cfg)[0]


@pytest.mark.parametrize("offload", [False, True])
def test_resume_equals_uninterrupted(tmp_path, offload):
    full = _make(offload)
    full_losses = [full.train_batch(batch(seed=t)) for t in range(6)]
    first = _make(offload)
    for t in range(3):
        first.train_batch(batch(seed=t))
    assert first.optimizer.pending is not None      # fused: step 2's update is still pending when saving
    first.save_checkpoint(str(tmp_path), client_state={"epoch": 1})
    resumed = _make(offload)
    path, client = resumed.load_checkpoint(str(tmp_path))
    assert client == {"epoch": 1} and path.endswith("global_step3")
    assert resumed.global_steps == 3 and len(resumed.step_log) == 3
    assert [resumed.train_batch(batch(seed=t)) for t in range(3, 6)] == full_losses[3:]
    a, b = full.module_state_dict(), resumed.module_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [(r.seed, r.g, r.lr) for r in full.step_log] == [(r.seed, r.g, r.lr) for r in resumed.step_log]


def test_layout_on_disk_and_latest(tmp_path):
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path), tag="first")
    e.train_batch(batch(seed=1))
    e.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == "global_step2"
    for tag in ("first", "global_step2"):
        assert {f.name for f in (tmp_path / tag).iterdir()} == {"zo_state.json", "steps.jsonl",
                                                                  "zo_rank_00000.safetensors"}
    assert len((tmp_path / "global_step2" / "steps.jsonl").read_text().splitlines()) == 2
    state = json.loads((tmp_path / "global_step2" / "zo_state.json").read_text())
    assert state["global_steps"] == 2 and state["layout"]["world"] == 1
    fresh = _engine()
    fresh.load_checkpoint(str(tmp_path), tag="first")
    assert fresh.global_steps == 1


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path))
    expected = {n: p.clone() for n, p in e.module_state_dict().items()}
    e.train_batch(batch(seed=1))
    import ds_zo.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(ck, "_write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        e.save_checkpoint(str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "global_step1"
    assert (tmp_path / "global_step2.partial").exists() and not (tmp_path / "global_step2").exists()
    fresh = _engine()
    fresh.load_checkpoint(str(tmp_path))
    got = fresh.module_state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_tampered_truncated_and_mismatched_checkpoints_are_refused(tmp_path):
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path))
    folder = tmp_path / "global_step1"
    weights = folder / "zo_rank_00000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        _engine().load_checkpoint(str(tmp_path))
    e.save_checkpoint(str(tmp_path))                       # a good copy again
    steps = folder / "steps.jsonl"
    steps.write_text(steps.read_text()[:-10])
    with pytest.raises(CheckpointError, match="steps.jsonl"):
        _engine().load_checkpoint(str(tmp_path))
    e.save_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="different model"):
        _engine(arch="qwen2").load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="another parameter set"):
        _engine(trainable=["*layers.0*"]).load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="zo_state.json is missing"):
        _engine().load_checkpoint(str(tmp_path / "nowhere"), tag="global_step2")      # a tag given must be there
    with pytest.raises(CheckpointError, match="plain folder name"):
        e.save_checkpoint(str(tmp_path), tag="../escape")
    (folder / "zo_state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        _engine().load_checkpoint(str(tmp_path))
    assert not os.path.exists(tmp_path.parent / "escape")


@pytest.mark.parametrize("stage", ["state", "latest"])
def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, stage):
    import subprocess
    import sys
    from ds_zo.parallel.local_ranks import ROOT, loopback_env
    proc = subprocess.run([sys.executable, os.path.join("tests", "save_victim.py"), str(tmp_path), stage], cwd=ROOT,
                          env=loopback_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "latest").read_text() == "global_step1"
    fresh = _engine()
    path, _ = fresh.load_checkpoint(str(tmp_path))
    assert path.endswith("global_step1") and fresh.global_steps == 1
    # the interrupted save's leftovers are cleaned up by the next save of that tag
    assert fresh.train_batch(batch(seed=1)) > 0
    fresh.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert not (tmp_path / "global_step2.partial").exists()


def test_the_z_sampler_is_recorded_and_replay_runs_only_on_it(tmp_path, caplog):
    """z depends on the device's sampler (on CUDA, on the GPU's SM count): the checkpoint records it, ds_zo.replay
    replays on it and refuses another one, and resuming on another one marks the step log as mixed."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    model, _ = tiny_model_and_tokenizer()
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, seed=4))
    engine.train_batch(batch())                               # ids < 96 <= the tiny vocabulary
    engine.save_checkpoint(str(tmp_path / "ck"))
    state_path = os.path.join(tmp_path, "ck", "global_step1", "zo_state.json")
    state = json.loads(open(state_path).read())
    assert state["z_stream"] == "cpu" == engine.z_stream
    replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])
    state["z_stream"] = "cuda/132x2048"                       # as if the run had been on an H100
    with open(state_path, "w") as f:
        json.dump(state, f)
    with pytest.raises(SystemExit, match=r"drew z on cuda/132x2048, this replay would draw it on cpu"):
        replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r"),
                     "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"drew z on cuda/132x2048; this machine has no CUDA device"):
            replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        engine.load_checkpoint(str(tmp_path / "ck"))
    assert "mixes two z streams" in caplog.text
    assert engine.z_stream == "mixed(cuda/132x2048, cpu)"
    engine.train_batch(batch(seed=2))
    engine.save_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(SystemExit, match=r"mixes two z streams \(cuda/132x2048, cpu\): no single device"):
        replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])


def test_a_save_killed_between_its_renames_leaves_the_tag_loadable(tmp_path, monkeypatch):
    """Replacing a tag moves the old folder aside, then the new one in: killed in between, `latest` names a tag
    whose folder is only `<tag>.old`, which is read instead; the next save of the tag completes and removes it, and a
    save of another tag removes the leftovers nothing reads."""
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path), tag="t")
    expected = {n: p.clone() for n, p in e.module_state_dict().items()}
    e.train_batch(batch(seed=1))
    import ds_zo.checkpoint as ck
    real = os.replace

    def killed_after_the_first(src, dst):
        real(src, dst)
        if dst.endswith("t.old"):
            raise KeyboardInterrupt("killed between the renames")
    monkeypatch.setattr(ck.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        e.save_checkpoint(str(tmp_path), tag="t")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest", "t.old", "t.partial"]
    fresh = _engine()
    fresh.load_checkpoint(str(tmp_path))
    got = fresh.module_state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    e.save_checkpoint(str(tmp_path), tag="t")
    assert sorted(os.listdir(tmp_path)) == ["latest", "t"]
    # what saves of other tags left: a save of any tag removes it, but not a `.old` that is still the tag's only copy
    for leftover in ("t.old/x", "u.partial/y", "v.old/zo_state.json"):
        os.makedirs(tmp_path / leftover)
    e.save_checkpoint(str(tmp_path), tag="w")
    assert sorted(os.listdir(tmp_path)) == ["latest", "t", "v.old", "w"]
    with pytest.raises(CheckpointError, match="ending in '.old'"):
        e.save_checkpoint(str(tmp_path), tag="t.old")


def test_resuming_with_another_distribution_or_rows_is_refused(tmp_path):
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="'gaussian' distribution; this run uses 'rademacher'"):
        _engine(distribution="rademacher").load_checkpoint(str(tmp_path))
    rows = _engine(trainable=["*"], trainable_rows={"lm_head.weight": [1, 2]})
    with pytest.raises(CheckpointError, match=r"other rows \(zero_order.trainable_rows: saved none, this run "
                                              r"\{lm_head.weight: 2 rows\}\)"):
        rows.load_checkpoint(str(tmp_path))


def test_the_restored_weight_decay_is_the_one_steps_apply_and_record(tmp_path, caplog):
    """Resuming under a config with another weight_decay: the checkpoint's optimizer state wins (as DeepSpeed
    restores it), with a warning; the steps after it apply and record that value, so a replay of the step log
    rebuilds the run exactly."""
    from ds_zo.replay import replay
    e, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=ds_config(lr=1e-2, wd=0.0, seed=4))
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path))
    resumed = _engine()                                       # weight_decay 0.1 in its config
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        resumed.load_checkpoint(str(tmp_path))
    assert caplog.text.count("weight_decay 0.0 (this run's 0.1)") == 1        # said once, not once per group
    for t in range(1, 3):
        resumed.train_batch(batch(seed=t))
    resumed.flush()
    assert [r.wd for r in resumed.step_log] == [0.0, 0.0, 0.0]
    model = tiny_model("llama", tied=False)
    replay(model, resumed.step_log, sorted(resumed.trainable_names))
    live = resumed.module_state_dict()
    assert all(torch.equal(p, live[n]) for n, p in model.state_dict().items())


def test_weight_fingerprint_tells_weights_apart():
    """Per parameter, a hash of 4096 sampled elements' bytes with the shape and dtype: equal weights agree, a changed
    sampled element, another dtype or another shape does not; a ZeRO-3 partitioned parameter has none."""
    from ds_zo.weights_fingerprint import SAMPLES, weight_fingerprint
    a, b = tiny_model("llama", tied=False), tiny_model("llama", tied=False)
    fa = weight_fingerprint(a)
    assert fa == weight_fingerprint(b) and list(fa) == [n for n, _ in a.named_parameters()]
    assert all(isinstance(h, str) and len(h) == 16 for h in fa.values())
    with torch.no_grad():
        b.lm_head.weight.view(-1)[b.lm_head.weight.numel() // SAMPLES] += 1.0     # the second sampled element
    fb = weight_fingerprint(b)
    assert [n for n in fa if fa[n] != fb[n]] == ["lm_head.weight"]
    assert weight_fingerprint(tiny_model("llama", tied=False).to(torch.bfloat16)) != fa
    partitioned = torch.nn.Linear(4, 4, bias=False)
    partitioned.weight.data = torch.empty(0)
    partitioned.weight.ds_shape = torch.Size([4, 4])
    assert weight_fingerprint(partitioned) == {"weight": None}


def _with_finetuned_mlp():
    """The tiny job model whose MLP weights (the trained set of the tests below) already moved away from the base."""
    from ds_zo.models import tiny_model_and_tokenizer
    model, _ = tiny_model_and_tokenizer()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mlp" in n:
                p.add_(0.5)
    return model


def test_resume_and_replay_refuse_other_base_weights(tmp_path):
    """A checkpoint holds the trained parameters and the step log only. Resuming onto a model whose frozen weights
    differ (another base model of the same shapes) is refused, and so is replaying onto a model whose weights differ
    at all; a model that differs only in the trained parameters resumes, and the run's base is carried on."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    cfg = ds_config(lr=1e-2, seed=4, trainable=["*mlp*"])
    engine, *_ = ds_zo.initialize(model=tiny_model_and_tokenizer()[0], config=cfg)
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path / "ck"))
    state = json.loads(open(tmp_path / "ck" / "global_step1" / "zo_state.json").read())
    assert state["base_weights"] == engine.base_weights and len(state["base_weights"]) == len(state["model"])

    other = ds_zo.initialize(model=tiny_model_and_tokenizer(seed=1)[0], config=cfg)[0]
    with pytest.raises(CheckpointError, match=r"other base weights: \d+ parameters \(model\.embed_tokens\.weight, "
                                              r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        other.load_checkpoint(str(tmp_path / "ck"))

    resumed = ds_zo.initialize(model=_with_finetuned_mlp(), config=cfg)[0]
    assert resumed.base_weights != engine.base_weights
    resumed.load_checkpoint(str(tmp_path / "ck"))
    assert resumed.base_weights == engine.base_weights
    expected, got = engine.module_state_dict(), resumed.module_state_dict()
    assert all(torch.equal(expected[n], got[n]) for n in expected)

    model, tokenizer = tiny_model_and_tokenizer(seed=1)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match=r"is not the model this run started from: \d+ parameters .* hold other "
                                         r"weights"):
        replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", str(tmp_path / "other"),
                     "--output", str(tmp_path / "r")])
    replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])


def test_every_rank_keeps_rank0s_fingerprint():
    """Under ZeRO-3 the fingerprint is taken before partitioning, which keeps rank 0's weights: rank0s() hands rank
    0's table to every rank (here through a stand-in for the communicator's broadcast), None entries included."""
    from types import SimpleNamespace
    from ds_zo.weights_fingerprint import rank0s
    rank0 = {"a": "ffeeddccbbaa9988", "b": None, "c": "0011223344556677"}

    class FromRank0:
        dims = SimpleNamespace(world=2)

        def broadcast_from_rank0(self, tensors):
            tensors[0].copy_(torch.tensor([[1, int.from_bytes(bytes.fromhex(rank0["a"]), "big", signed=True)],
                                           [0, 0], [1, int.from_bytes(bytes.fromhex(rank0["c"]), "big",
                                                                      signed=True)]]))
    assert rank0s({"a": "0000000000000001", "b": "1111111111111111", "c": None}, FromRank0()) == rank0
    assert rank0s(rank0, SimpleNamespace(dims=SimpleNamespace(world=1))) == rank0


def test_a_bf16_run_resumes_and_replays_from_the_model_in_either_dtype(tmp_path):
    """With bf16 enabled DeepSpeed casts the model: the run fingerprints the bf16 weights it trains, so the same base
    loaded in fp32 or in bf16 resumes it, and replay casts the loaded model to the run's dtype."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    cfg = ds_config(lr=1e-2, seed=4, trainable=["*mlp*"])
    cfg["bf16"] = {"enabled": True}
    engine, *_ = ds_zo.initialize(model=tiny_model_and_tokenizer()[0], config=cfg)
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path / "ck"))
    expected = engine.module_state_dict()
    assert all(t.dtype == torch.bfloat16 for t in expected.values())
    for dtype in (torch.float32, torch.bfloat16):
        resumed = ds_zo.initialize(model=tiny_model_and_tokenizer(dtype=dtype)[0], config=cfg)[0]
        resumed.load_checkpoint(str(tmp_path / "ck"))
        got = resumed.module_state_dict()
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])
    from safetensors.torch import load_file
    replayed = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert all(torch.equal(replayed[n], expected[n]) for n in replayed if n in expected)


def test_a_checkpoint_without_base_weights_leaves_the_trained_base_unknown(tmp_path):
    """Checkpoints from before the field: resuming one from a model that already holds fine-tuned values must not
    record those as the run's base (a later replay onto the true base would be refused); the frozen ones are this
    model's, which the resumed run goes on with."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    cfg = ds_config(lr=1e-2, seed=4, trainable=["*mlp*"])
    engine, *_ = ds_zo.initialize(model=tiny_model_and_tokenizer()[0], config=cfg)
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path / "ck"))
    path = tmp_path / "ck" / "global_step1" / "zo_state.json"
    state = json.loads(path.read_text())
    del state["base_weights"]
    path.write_text(json.dumps(state))
    resumed = ds_zo.initialize(model=_with_finetuned_mlp(), config=cfg)[0]
    resumed.load_checkpoint(str(tmp_path / "ck"))
    assert {n for n, h in resumed.base_weights.items() if h is None} == resumed.trainable_names
    resumed.train_batch(batch(seed=1))
    resumed.save_checkpoint(str(tmp_path / "ck"))
    replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])


@pytest.mark.parametrize("precision, expected", [
    ({"bf16": {"enabled": True}}, torch.bfloat16), ({"bfloat16": {"enabled": True}}, torch.bfloat16),
    ({"fp16": {"enabled": True}}, torch.float16), ({"bf16": {"enabled": "auto"}}, None),
    ({"bf16": {"enabled": "false"}}, None), ({}, None)])
def test_the_fingerprints_dtype_is_the_one_deepspeed_casts_to(precision, expected):
    """half_dtype reads the fp16 / bf16 sections as DeepSpeed does (its spellings; "auto" and "false" are off): a run
    whose parameters stay fp32 must not record a bf16-cast fingerprint."""
    from ds_zo.config import half_dtype
    assert half_dtype(precision) == expected
    if expected is not torch.float16:    # fp16 runs where the accelerator supports it (not DeepSpeed's CPU one)
        engine = ds_zo.initialize(model=tiny_model("llama", tied=False), config={**ds_config(), **precision})[0]
        assert engine.half_dtype == expected
        assert {p.dtype for p in engine.module.parameters()} == {expected or torch.float32}


@pytest.mark.parametrize("stage, stored, half", [(0, "bf16", None), (3, "bf16", None), (0, "fp32", "bf16"),
                                                 (0, "fp16", "bf16")])
def test_a_run_with_offload_dtype_replays_and_buffers_keep_their_dtype(tmp_path, stage, stored, half):
    """zero_order.offload_dtype keeps offloaded units in another dtype than the rest: the checkpoint's parameters
    may have two dtypes (mixed dtypes are no reason to refuse). The run computes in its own dtype and rounds the
    offloaded layers' values to the stored dtype after every update; replay does the same (`stored_dtypes`), so it
    rebuilds the run's weights exactly: a narrower store (bf16 under fp32), a wider one (fp32 under bf16: no
    rounding), one as wide (fp16 under bf16: both roundings), and under ZeRO-3, where only the store shows the
    dtype. With bf16 enabled, replay casts parameters only, as DeepSpeed does, not buffers."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    from ds_zo.weights_fingerprint import cast_parameters
    from safetensors.torch import load_file
    cfg = ds_config(lr=5e-2, wd=0.1, seed=4, offload_dtype=stored)
    cfg["zero_optimization"] = {"stage": stage, "offload_param": {"device": "cpu"}}
    if half:
        cfg[half] = {"enabled": True}
    engine, *_ = ds_zo.initialize(model=tiny_model_and_tokenizer()[0], config=cfg)
    engine.train_batch(batch())
    engine.train_batch(batch(seed=2))
    engine.save_checkpoint(str(tmp_path / "ck"))
    trained = engine.module_state_dict()
    state = json.loads((tmp_path / "ck" / "global_step2" / "zo_state.json").read_text())
    stored_dtype = {"bf16": "torch.bfloat16", "fp32": "torch.float32", "fp16": "torch.float16"}[stored]
    assert set(state["stored_dtypes"].values()) == {stored_dtype}
    assert state["stored_dtypes"] and all(".layers." in n for n in state["stored_dtypes"])
    assert state["half_dtype"] == ("torch.bfloat16" if half else None)
    replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])
    replayed = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert {t.dtype for t in replayed.values()} == {torch.bfloat16 if half else torch.float32}   # as loaded
    assert all(torch.equal(t.double(), trained[n].double()) for n, t in replayed.items())
    model = tiny_model_and_tokenizer()[0]
    model.register_buffer("scale", torch.ones(3), persistent=True)
    cast_parameters(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.scale.dtype == torch.float32


def test_replay_refuses_a_checkpoint_whose_half_dtype_no_parameter_has(tmp_path):
    """A ZeRO-3 run with bf16 enabled trained in fp32 before ds_zo cast partitioned models, while its checkpoint
    recorded bf16: replay says it cannot rebuild such a run rather than replaying it in bf16 into other weights."""
    from ds_zo import replay
    from ds_zo.models import tiny_model_and_tokenizer
    engine, *_ = ds_zo.initialize(model=tiny_model_and_tokenizer()[0], config=ds_config(lr=1e-2, seed=4))
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path / "ck"))
    state_file = tmp_path / "ck" / "global_step1" / "zo_state.json"
    state = json.loads(state_file.read_text())
    state["half_dtype"] = "torch.bfloat16"                 # as such a run recorded it, its parameters all fp32
    state_file.write_text(json.dumps(state))
    with pytest.raises(SystemExit, match="records torch.bfloat16 but none of its parameters in it"):
        replay.main(["--checkpoint", str(tmp_path / "ck"), "--model", "tiny", "--output", str(tmp_path / "r")])


def test_a_scheduler_added_or_dropped_on_resume_is_warned_about(tmp_path, caplog):
    """Resuming under a config that adds an lr scheduler restarts its schedule, and one that drops it freezes the
    lr: neither is an error (a user may mean it), neither is silent."""
    plain, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=ds_config(lr=1e-2, wd=0.1, seed=4))
    plain.train_batch(batch())
    plain.save_checkpoint(str(tmp_path / "plain"))
    scheduled = _engine()
    scheduled.train_batch(batch())
    scheduled.save_checkpoint(str(tmp_path / "scheduled"))
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        _engine().load_checkpoint(str(tmp_path / "plain"))
    assert "had no lr scheduler and the config has one: its schedule starts from its own first step at step 1" \
        in caplog.text
    caplog.clear()
    unscheduled, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=ds_config(lr=1e-2, wd=0.1, seed=4))
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        unscheduled.load_checkpoint(str(tmp_path / "scheduled"))
    assert "had an lr scheduler and the config has none: the lr stays at the checkpoint's ([0.0, 0.0]) from step 1" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        _engine().load_checkpoint(str(tmp_path / "scheduled"))
    assert "lr scheduler" not in caplog.text


def test_partial_loads_are_refused_by_name(tmp_path):
    """DeepSpeed's load_checkpoint options that restore part of a run would not continue it: refused, naming them."""
    e = _engine()
    e.train_batch(batch())
    e.save_checkpoint(str(tmp_path))
    for option in ({"load_module_only": True}, {"load_optimizer_states": False},
                   {"load_lr_scheduler_states": False}, {"load_module_strict": False}):
        fresh = _engine()
        (name, value), = option.items()
        with pytest.raises(ValueError, match=rf"{name}={value!r}.*restored whole"):
            fresh.load_checkpoint(str(tmp_path), **option)
        assert fresh.global_steps == 0 and not fresh.step_log
    fresh = _engine()
    fresh.load_checkpoint(str(tmp_path), load_module_strict=True, load_optimizer_states=True)
    assert fresh.global_steps == 1


def test_resuming_under_the_same_scheduled_config_warns_nothing(tmp_path, caplog):
    """An lr the scheduler set is the schedule's (restored with it), not a config value the checkpoint replaces: an
    ordinary resume, same config, says nothing about the optimizer state (it used to name the lr once per group)."""
    e = _engine()
    for t in range(3):
        e.train_batch(batch(seed=t))
    e.save_checkpoint(str(tmp_path))
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        resumed = _engine()
        resumed.load_checkpoint(str(tmp_path))
    assert "optimizer state" not in caplog.text and [g["lr"] for g in resumed.optimizer.param_groups] == \
        [g["lr"] for g in e.optimizer.param_groups]


def test_a_folder_with_no_checkpoint_yet_loads_nothing_as_in_deepspeed(tmp_path, caplog):
    """DeepSpeed's resume idiom, `path, _ = engine.load_checkpoint(dir)` then `if path is None: start fresh`: with no
    'latest' in dir (or no dir) nothing is loaded, (None, None) comes back with a warning, and the engine trains as
    one that never called it. The ranks decide together: where they disagree, every rank is told which see it."""
    first, untouched = _engine(), _engine()
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        assert first.load_checkpoint(str(tmp_path)) == (None, None)
        assert first.load_checkpoint(str(tmp_path / "not_made_yet")) == (None, None)
    assert "no checkpoint to load" in caplog.text and not os.listdir(tmp_path)
    assert first.train_batch(batch()) == untouched.train_batch(batch())
    first.flush(), untouched.flush()
    assert all(torch.equal(p, q) for p, q in zip(first.module.parameters(), untouched.module.parameters()))
    first.save_checkpoint(str(tmp_path))
    first.comm.gather_strings = lambda value, **_: [value, "0"]        # rank 1 of 2 sees no 'latest'
    with pytest.raises(CheckpointError, match=r"ranks \[1\] see no checkpoint .* and ranks \[0\] do"):
        first.load_checkpoint(str(tmp_path))


def test_replay_given_the_training_output_folder_points_at_its_checkpoints(tmp_path, capsys):
    """`--checkpoint OUTPUT_DIR` (not OUTPUT_DIR/checkpoints) was reported as an incomplete checkpoint; it is named
    as neither kind of checkpoint folder, with the folder ds_zo.train writes them to."""
    from ds_zo import replay
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        replay.main(["--checkpoint", str(tmp_path / "out"), "--model", "tiny", "--output", str(tmp_path / "r")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "is neither a checkpoint folder (with a 'latest' file) nor one tag's folder" in err
    assert f"ds_zo.train writes its checkpoints to {tmp_path / 'out' / 'checkpoints'}" in err


def test_client_state_must_come_back_from_json_as_given(tmp_path):
    """client_state is kept as JSON (loading never unpickles): what JSON would change silently (a tuple into a list,
    an int key into a string) or cannot hold (a tensor, a NumPy integer) is refused by path before anything is
    written; JSON values, a float NaN among them, come back as given."""
    import numpy as np
    e = _engine()
    e.train_batch(batch())
    for bad, match in [({"best": (0.1, 3)}, r"client_state\['best'\]: a tuple"),
                       ({1: 0.5}, r"client_state: key 1 is a int, which JSON would turn into the string \"1\""),
                       ({"rng": [torch.zeros(2)]}, r"client_state\['rng'\]\[0\]: a Tensor"),
                       ({"n": np.int64(3)}, r"client_state\['n'\]: a int64")]:
        with pytest.raises(CheckpointError, match=match):
            e.save_checkpoint(str(tmp_path / "bad"), client_state=bad)
        assert not (tmp_path / "bad").exists()
    good = {"epoch": 1, "history": [0.5, float("inf"), None, True], "nested": {"a": "b"}}
    e.save_checkpoint(str(tmp_path / "good"), client_state=good)
    assert _engine().load_checkpoint(str(tmp_path / "good"))[1] == good


def test_a_deepspeed_checkpoint_is_named_as_one(tmp_path):
    """A checkpoint written by DeepSpeed's own engine (a first-order run being switched to ds_zo) is told apart from
    an interrupted ds_zo save, and the message says how to carry its weights over."""
    import deepspeed
    model = tiny_model("llama")
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    first_order, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    first_order.backward(first_order(**batch()).loss)
    first_order.step()
    first_order.save_checkpoint(str(tmp_path))
    first_order.destroy()
    with pytest.raises(CheckpointError, match=r"written by DeepSpeed's own engine \(mp_rank_00_model_states.pt\), "
                                              r"not by ds_zo"):
        _engine().load_checkpoint(str(tmp_path))


def test_eps_or_perturbations_changed_on_resume_are_warned_about(tmp_path, caplog):
    """eps and num_perturbations come from the config on resume (the checkpoint's lr and wd replace the config's,
    with a warning): a change went unsaid."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, eps=1e-3, seed=4))
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path))
    same, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, eps=1e-3, seed=4))
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        same.load_checkpoint(str(tmp_path))
    assert "trained with" not in caplog.text
    other, *_ = ds_zo.initialize(model=tiny_model("llama"),
                                 config=ds_config(lr=1e-2, eps=2e-3, seed=4, num_perturbations=2))
    with caplog.at_level("WARNING", logger="ds_zo.checkpoint"):
        other.load_checkpoint(str(tmp_path))
    assert "trained with eps 0.001; this run goes on with the config's 0.002" in caplog.text
    assert "trained with num_perturbations 1; this run goes on with the config's 2" in caplog.text


def test_a_checkpoint_of_another_model_names_what_differs(tmp_path):
    """'saved from a different model (parameter names, shapes or dtypes differ)' left a user who had flipped
    bf16.enabled guessing: the message names the parameters and the dtypes."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=4))
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path))
    cfg = ds_config(seed=4)
    cfg["bf16"] = {"enabled": True}
    half, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    with pytest.raises(CheckpointError, match=r"dtype saved -> now: model\.embed_tokens\.weight torch\.float32 -> "
                                              r"torch\.bfloat16.*another bf16/fp16 setting"):
        half.load_checkpoint(str(tmp_path))
    untied, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=ds_config(seed=4))
    with pytest.raises(CheckpointError, match=r"parameters only in this model: lm_head\.weight"):
        untied.load_checkpoint(str(tmp_path))
