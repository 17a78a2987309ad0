"""The public API behaves like DeepSpeed's: initialize, config files, dataloaders, monitors, checkpoints."""
import argparse
import os

import deepspeed
import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

import ds_zo
from ds_zo.engine import ZOEngine
from conftest import ds_config
from models import VOCAB, assert_same_state, batch, tiny_model

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_initialize_returns_deepspeed_style_tuple():
    engine, optimizer, loader, scheduler = ds_zo.initialize(model=tiny_model("llama"), config=ds_config())
    assert isinstance(engine, ZOEngine) and isinstance(engine, DeepSpeedEngine)
    assert isinstance(optimizer, ds_zo.ZOSGD) and engine.optimizer is optimizer
    assert loader is None and scheduler is None
    assert engine.global_steps == 0 and engine.last_projected_grad is None


def test_plain_deepspeed_initialize_points_to_ds_zo():
    with pytest.raises(RuntimeError, match=r"ds_zo\.initialize"):
        deepspeed.initialize(model=tiny_model("llama"), config=ds_config())


def test_registration_is_reversible():
    assert torch.optim.ZOSGD is ds_zo.registry.ZOSGDNeedsZOEngine
    ds_zo.registry.unregister()
    try:
        assert not hasattr(torch.optim, "ZOSGD")
    finally:
        ds_zo.registry.register()
    assert hasattr(torch.optim, "ZOSGD")


def test_config_file_and_args_deepspeed_config(tmp_path):
    path = os.path.join(ROOT, "configs", "zo_sgd_tiny.json")
    e1, _, _, sched = ds_zo.initialize(model=tiny_model("gpt2"), config=path)
    assert sched is not None and e1.train_micro_batch_size_per_gpu() == 4
    args = argparse.Namespace(deepspeed_config=path, local_rank=0)
    e2, *_ = ds_zo.initialize(args=args, model=tiny_model("gpt2"))
    b = batch(rows=4)
    assert e1.train_batch(b) == e2.train_batch(b)
    assert e1.last_projected_grad == e2.last_projected_grad


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long)}


def test_training_data_gives_a_dataloader_that_train_batch_consumes():
    cfg = ds_config(micro=2)
    cfg["gradient_accumulation_steps"] = 2
    engine, _, loader, _ = ds_zo.initialize(model=tiny_model("llama"), config=cfg, training_data=_Rows(16))
    assert loader is not None and len(loader) == 8
    for _ in range(3):
        assert engine.train_batch() > 0
    assert engine.global_steps == 3 and engine.global_samples == 12  # 2 micro-batches of 2 rows per step


def test_the_engines_dataloader_runs_epoch_after_epoch_and_a_resumed_run_goes_on_where_it_was(tmp_path):
    """train_batch() with training_data: past the last micro-batch a new epoch begins (it raised StopIteration), and
    a run resumed from a checkpoint takes the micro-batches the uninterrupted run would have (it restarted the
    epoch). DeepSpeed's loader samples with a DistributedSampler (local_rank >= 0, which ds_zo sets outside
    launchers too), whose order is a function of the epoch."""
    def engine():
        cfg = ds_config(micro=2)
        cfg["gradient_accumulation_steps"] = 2
        return ds_zo.initialize(args=argparse.Namespace(local_rank=0), model=tiny_model("llama"), config=cfg,
                                training_data=_Rows(12))[0]
    whole = engine()
    losses = [whole.train_batch() for _ in range(5)]            # 3 micro-batches an epoch: 2 epochs and more
    part = engine()
    assert [part.train_batch() for _ in range(2)] == losses[:2]
    part.save_checkpoint(str(tmp_path))
    resumed = engine()
    resumed.load_checkpoint(str(tmp_path))
    assert [resumed.train_batch() for _ in range(3)] == losses[2:]
    with pytest.raises(ValueError, match="data_iter ran out at step 5"):
        whole.train_batch(data_iter=iter([batch(rows=2)]))


def test_hf_batch_encodings_are_batches():
    """HF's tokenizers and collators hand batches over as a BatchEncoding (a UserDict, not a dict): train_batch,
    eval_batch and the engine's dataloader take them as the same batch. A batch that is no mapping is refused by
    type."""
    from transformers import BatchEncoding
    b = batch()
    engines = [ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=1))[0] for _ in range(2)]
    loss = engines[1].train_batch(b)
    assert engines[0].train_batch(BatchEncoding(b)) == loss
    assert engines[0].eval_batch(BatchEncoding(b)) == engines[1].eval_batch(b)
    rows = [{k: v[i] for k, v in b.items()} for i in range(2)]
    engine, _, loader, _ = ds_zo.initialize(
        model=tiny_model("llama"), config=ds_config(seed=1), training_data=rows,
        collate_fn=lambda items: BatchEncoding(torch.utils.data.default_collate(items)))
    assert engine.train_batch() == pytest.approx(loss, rel=1e-7)      # (the loader may order the two rows otherwise)
    with pytest.raises(TypeError, match="a batch must be a mapping with at least 'input_ids'.*got list"):
        engines[0].train_batch([b["input_ids"]])
    with pytest.raises(TypeError, match=r"got dict with keys \['ids', 1\]"):
        engines[0].train_batch({"ids": b["input_ids"], 1: None})


def test_gradient_accumulation_draws_micro_batches_from_data_iter():
    """gradient_accumulation_steps micro-batches from an iterator make one step, equal to one step on their union."""
    cfg = ds_config(micro=2)
    cfg["gradient_accumulation_steps"] = 2
    e1, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    e2, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    whole = batch(rows=4)
    halves = [{k: v[i:i + 2] for k, v in whole.items()} for i in (0, 2)]
    assert e1.train_batch(data_iter=iter(halves)) == pytest.approx(e2.train_batch(whole), rel=1e-12)
    assert e1.last_projected_grad == pytest.approx(e2.last_projected_grad, rel=1e-9)
    with pytest.raises(ValueError, match="training_data"):
        e1.train_batch()
    with pytest.raises(TypeError, match="input_ids"):
        e1.train_batch({"ids": whole["input_ids"]})


def test_csv_monitor_receives_loss_g_and_lr(tmp_path):
    cfg = ds_config(lr=1e-3)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "zo"}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    losses = [engine.train_batch(batch()) for _ in range(3)]
    grads = [r.g[0] for r in engine.step_log]
    files = {f for _, _, fs in os.walk(tmp_path) for f in fs}
    assert {"Train_Samples_train_loss.csv", "Train_Samples_projected_grad.csv", "Train_Samples_lr.csv"} <= files

    def read(name):
        path = next(os.path.join(d, name) for d, _, fs in os.walk(tmp_path) if name in fs)
        with open(path) as f:
            return [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]
    assert read("Train_Samples_train_loss.csv") == pytest.approx(losses)
    assert read("Train_Samples_projected_grad.csv") == pytest.approx(grads)
    assert read("Train_Samples_lr.csv") == pytest.approx([1e-3] * 3)


def test_checkpoint_includes_pending_update_and_step_log(tmp_path):
    engine, *_ = ds_zo.initialize(model=tiny_model("opt"), config=ds_config(seed=4))
    for i in range(2):
        engine.train_batch(batch(seed=i))
    assert engine.optimizer.pending is not None
    engine.save_checkpoint(str(tmp_path), tag="t2")
    expected = {n: p.clone() for n, p in engine.module_state_dict().items()}
    fresh, *_ = ds_zo.initialize(model=tiny_model("opt"), config=ds_config(seed=4))
    fresh.load_checkpoint(str(tmp_path), tag="t2")
    got = fresh.module_state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert fresh.global_steps == 2 and [r.seed for r in fresh.step_log] == [r.seed for r in engine.step_log]
    # training on continues exactly as the original would
    assert fresh.train_batch(batch(seed=5)) == engine.train_batch(batch(seed=5))
    assert fresh.last_projected_grad == engine.last_projected_grad
    with open(tmp_path / "latest") as f:
        assert f.read().strip() == "t2"


def test_one_engine_per_model_and_destroy_detaches_it():
    """An engine's hooks apply its pending update to every forward of its model: a second engine on the same model
    is refused until the first is destroyed (its update applied, its and DeepSpeed's hooks removed); a copy of the
    model is free to take."""
    import copy
    model = tiny_model("llama")
    first, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, seed=1))
    first.train_batch(batch())
    assert first.optimizer.pending is not None                 # fused: applied inside the next forward
    with pytest.raises(ValueError, match="already trained by a ds_zo engine.*destroy\\(\\) first"):
        ds_zo.initialize(model=model, config=ds_config())
    copied = copy.deepcopy(model)                      # a copy is another model, with every completed step,
    assert first.optimizer.pending is None
    first.train_batch(batch(seed=4))
    copied(input_ids=batch()["input_ids"])
    assert first.optimizer.pending is not None         # whose forwards leave the engine alone
    ds_zo.initialize(model=copied, config=ds_config())
    updated = {n: p.clone() for n, p in first.module_state_dict().items()}
    hooks_before = len(model._forward_pre_hooks) + len(model._forward_hooks)
    first.destroy()
    assert first.optimizer.pending is None
    assert all(torch.equal(p, updated[n]) for n, p in model.state_dict().items())
    assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks_before - 4 and hooks_before >= 4
    second, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, seed=2))
    again, *_ = ds_zo.initialize(model=copy.deepcopy(model), config=ds_config(lr=1e-2, seed=2))
    assert second.train_batch(batch(seed=3)) == again.train_batch(batch(seed=3))
    with pytest.raises(RuntimeError, match="destroyed"):
        first.train_batch(batch())
    with pytest.raises(RuntimeError, match="eval_batch: this engine was destroyed"):
        first.eval_batch(batch())                      # its stale pipeline would be streamed into the model


@pytest.mark.parametrize("offload", [False, True])
def test_the_decoder_body_called_directly_sees_every_completed_step(offload):
    """Helpers call the decoder body (HF's base_model, model.model) directly: its forward and its state_dict apply a
    pending (fused) update first, as the whole model's do; with offload its forward streams the layers."""
    cfg = ds_config(lr=1e-1, seed=1)
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    engine.train_batch(batch())
    assert engine.optimizer.pending is not None
    ids = batch(seed=5)["input_ids"]
    with torch.no_grad():
        direct = engine.module.model(input_ids=ids).last_hidden_state
    assert engine.optimizer.pending is None
    engine.train_batch(batch(seed=1))
    body = engine.module.model.state_dict()
    assert engine.optimizer.pending is None
    whole = engine.module_state_dict()
    assert all(torch.equal(v, whole["model." + k]) for k, v in body.items())
    with torch.no_grad():
        again = engine.module.model(input_ids=ids).last_hidden_state
        logits = engine.module(input_ids=ids).logits             # the whole model's forward: the body's hooks nest
    assert not torch.equal(direct, again) and logits.shape[-1] == VOCAB


@pytest.mark.parametrize("offload", [False, True])
def test_a_copy_of_the_model_has_every_completed_step_and_no_engine(offload, tmp_path):
    """After train_batch the last update is still pending (fused into the next forward). copy.deepcopy(model) and
    torch.save(model) apply it first, as state_dict() does: the copy is the trained model, not the one a step before.
    The copy is a plain model: its forwards leave the engine alone and it does not keep the engine alive."""
    import copy
    import gc
    import weakref
    cfg = ds_config(lr=1e-1, seed=1)
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    engine.train_batch(batch())
    engine.train_batch(batch(seed=2))
    assert engine.optimizer.pending is not None
    embedding = engine.module.model.embed_tokens.weight
    before = embedding.detach().clone()
    # a parameter copied before the model (same memo) is refreshed too
    copied = copy.deepcopy({"embedding": embedding, "model": engine.module})
    trained = engine.module_state_dict()
    assert not torch.equal(trained["model.embed_tokens.weight"], before)     # the pending update changed it
    best = copied["model"]
    assert all(torch.equal(p, trained[n]) for n, p in best.state_dict().items())
    assert copied["embedding"] is best.model.embed_tokens.weight
    torch.save(engine.module, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(torch.equal(p, trained[n]) for n, p in loaded.state_dict().items())

    engine.train_batch(batch(seed=3))
    steps = engine.global_steps
    with torch.no_grad():
        best(input_ids=batch()["input_ids"])
        loaded(input_ids=batch()["input_ids"])
    assert engine.optimizer.pending is not None and engine.global_steps == steps
    again, *_ = ds_zo.initialize(model=best, config=cfg)             # a copy is free to take
    again.destroy()

    alive = weakref.ref(engine)
    engine.destroy()
    del engine, embedding, _
    gc.collect()
    assert alive() is None                      # the copies' hooks held it until now
    with torch.no_grad():
        assert torch.isfinite(best(input_ids=batch()["input_ids"]).logits).all()


@pytest.mark.parametrize("offload", [False, True])
def test_restoring_saved_weights_into_the_live_model_keeps_them(offload):
    """"Keep the best model, restore it later": model.load_state_dict(best) while the last step's update is pending.
    The load applies the pending update first (as state_dict() does), so the loaded weights stay as loaded; the
    pending update used to land on top of them at the next read. The next step starts from them."""
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    model = tiny_model("llama")
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    engine.train_batch(batch(seed=0))
    best = {k: v.clone() for k, v in model.state_dict().items()}
    engine.train_batch(batch(seed=1))
    assert engine.optimizer.pending is not None
    model.load_state_dict(best)
    assert engine.optimizer.pending is None
    now = model.state_dict()
    assert all(torch.equal(best[k], now[k]) for k in best)
    assert all(torch.equal(best[k], v) for k, v in engine.module_state_dict().items())
    engine.train_batch(batch(seed=2))
    after = engine.module_state_dict()
    assert any(not torch.equal(best[k], after[k]) for k in best)        # one step on from the loaded weights
    with pytest.raises(RuntimeError, match=r"assign=True\) .* would replace its parameters"):
        model.load_state_dict(best, assign=True)
    assert all(torch.equal(after[k], v) for k, v in engine.module_state_dict().items())     # nothing loaded
    engine.destroy()


def test_loading_weights_into_a_zero3_model_is_refused_before_anything_is_loaded():
    """Under ZeRO-3 the offloaded layers' parameters are placeholders: model.load_state_dict used to load the
    resident units and then stop at the first placeholder (torch's size mismatch), leaving a half-loaded model."""
    cfg = ds_config()
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "cpu"}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    engine.train_batch(batch())
    before = engine.module_state_dict()
    weights = {k: torch.zeros_like(v) for k, v in before.items()}
    with pytest.raises(RuntimeError, match="ZeRO-3 partitioned: .*engine.load_checkpoint"):
        engine.module.load_state_dict(weights)
    assert all(torch.equal(before[k], v) for k, v in engine.module_state_dict().items())
    engine.destroy()


def test_a_shallow_copy_is_the_model_and_a_failed_initialize_leaves_no_hooks(tmp_path):
    """copy.copy(model) shares the parameters and hooks: it is the trained model (its forward applies the pending
    update) and a second engine on it is refused. An initialize that fails after DeepSpeed hooked the model removes
    those hooks: nothing of the half-built engine stays on the model."""
    import copy
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, seed=1))
    engine.train_batch(batch())
    alias = copy.copy(engine.module)
    with torch.no_grad():
        alias(input_ids=batch()["input_ids"])
    assert engine.optimizer.pending is None
    with pytest.raises(ValueError, match="already trained by a ds_zo engine"):
        ds_zo.initialize(model=alias, config=ds_config())

    def failing_scheduler(optimizer):
        raise RuntimeError("no scheduler today")

    model = tiny_model("llama")
    rows_with_offload = ds_config(trainable_rows={"model.embed_tokens.weight": [0, 1]})
    rows_with_offload["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    with pytest.raises(ValueError, match="trainable_rows cannot be combined with offload_param"):
        ds_zo.initialize(model=model, config=rows_with_offload)          # fails in ds_zo's part
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(RuntimeError, match="no scheduler today"):      # fails inside DeepSpeed's constructor
        ds_zo.initialize(model=model, config=ds_config(), lr_scheduler=failing_scheduler)
    assert not model._forward_pre_hooks and not model._forward_hooks
    torch.save(model, tmp_path / "model.pt")                # DeepSpeed's closures would not pickle
    retry, optimizer, *_ = ds_zo.initialize(model=model, config=ds_config())
    retry.train_batch(batch())
    retry.destroy()
    no_layer_offloaded = ds_config(resident_units=["*"])
    no_layer_offloaded["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    with pytest.raises(ValueError, match="no unit is offloaded"):
        ds_zo.initialize(model=model, config=no_layer_offloaded, optimizer=optimizer)
    assert "zo_step_log" in optimizer.state_dict()     # the half-built engine is not its flush


def test_the_deepspeed_forward_backward_step_loop_points_to_train_batch():
    """A DeepSpeed user's loop (loss = engine(batch); engine.backward(loss); engine.step()) would train nothing
    under ZO: backward and step refuse, naming train_batch, and leave the parameters as they were."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config())
    before = {n: p.clone() for n, p in engine.module_state_dict().items()}
    out = engine(**batch())
    with pytest.raises(RuntimeError, match=r"engine\.train_batch\(batch\)"):
        engine.backward(out.loss)
    with pytest.raises(RuntimeError, match=r"engine\.train_batch\(batch\)"):
        engine.step()
    assert engine.global_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in engine.module_state_dict().items())


def test_global_samples_counts_the_rows_given_and_a_batch_unlike_the_config_is_warned_about(caplog):
    """train_batch(batch) is one ZO step over the rows it is given: DeepSpeed code that hands it one micro-batch per
    call would take gradient_accumulation_steps steps, not one, so the first such call warns; global_samples (the
    monitor's x axis) counts the rows, not train_batch_size."""
    cfg = ds_config(micro=2)
    cfg["gradient_accumulation_steps"] = 2
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    with caplog.at_level("WARNING"):
        engine.train_batch(batch(rows=4))
    assert "got" not in caplog.text and engine.global_samples == 4
    with caplog.at_level("WARNING"):
        engine.train_batch(batch(rows=2))
        engine.train_batch(batch(rows=3))
    assert caplog.text.count("train_batch(batch) got 2 rows, while this rank's share of a global batch is "
                             "train_micro_batch_size_per_gpu x gradient_accumulation_steps = 4") == 1
    assert engine.global_steps == 3 and engine.global_samples == 4 + 2 + 3


def test_a_zero3_models_state_dict_is_refused_and_module_state_dict_saves_it(tmp_path):
    """Under ZeRO-3 the offloaded layers' parameters are DeepSpeed's empty placeholders: save_pretrained(dir) wrote
    them without a word and the model could not be loaded. Reading them is refused, naming the way that works:
    engine.module_state_dict() (the gathered parameters) passed to save_pretrained."""
    from transformers import AutoModelForCausalLM
    cfg = ds_config()
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "cpu"}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    engine.train_batch(batch())
    with pytest.raises(RuntimeError, match=r"ZeRO-3 partitioned: \d+ parameters .*engine\.module_state_dict\(\)"):
        engine.module.save_pretrained(tmp_path / "bare")
    with pytest.raises(RuntimeError, match="ZeRO-3 partitioned"):
        engine.module.model.state_dict()                   # HF's decoder body, which helpers call directly
    import copy
    with pytest.raises(RuntimeError, match="ZeRO-3 partitioned"):
        copy.deepcopy(engine.module).state_dict()            # a copy holds the placeholders too
    sd = engine.module_state_dict()
    engine.module.save_pretrained(tmp_path / "whole", state_dict=sd)
    engine.destroy()                                        # the model stays partitioned
    with pytest.raises(RuntimeError, match="ZeRO-3 partitioned"):
        engine.module.save_pretrained(tmp_path / "after_destroy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", local_files_only=True)
    assert all(torch.equal(p, sd[n]) for n, p in reloaded.state_dict().items() if n in sd)
    assert any(not torch.equal(p, q) for p, q in zip(reloaded.parameters(), tiny_model("llama").parameters()))


def test_models_that_are_not_causal_lms_are_refused_by_name():
    from transformers import LlamaConfig, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        ds_zo.initialize(model=t5, config=ds_config())
    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            num_labels=2, pad_token_id=0))
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification has no language-model head"):
        ds_zo.initialize(model=classifier, config=ds_config())


def _offloaded(cfg):
    cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    return cfg


def test_a_direct_forward_interrupted_by_ctrl_c_leaves_training_as_it_was():
    """With offload a direct forward (here generate) streams the layers through one-slot wrappers that its end
    removes. torch's always_call forward hook does not run on a KeyboardInterrupt, so they stayed on, and every later
    ZO step perturbed nothing (g −3.75 against −4.77 at once, then diverging). train_batch ends such a pass first."""
    runs = []
    for interrupt in (False, True):
        engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=_offloaded(ds_config(lr=1e-2, seed=3)))
        engine.train_batch(batch(seed=0))
        if interrupt:
            def ctrl_c(*_):
                raise KeyboardInterrupt
            hook = engine.module.model.layers[1].register_forward_hook(ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                engine.module.generate(batch()["input_ids"], max_new_tokens=2, do_sample=False)
            hook.remove()
        losses = [engine.train_batch(batch(seed=t)) for t in (1, 2)]
        runs.append((losses, engine.last_projected_grad, engine.module_state_dict()))
    assert runs[1][:2] == runs[0][:2]
    assert_same_state(runs[1][2], runs[0][2])


def test_eval_batch_after_a_ctrl_c_in_a_direct_forward_gives_autograd_back():
    """With offload a grad-enabled direct forward runs without autograd until its pass ends; after a KeyboardInterrupt
    eval_batch ends the pass, but its no_grad had recorded the mode the open pass held, and restored it: autograd
    stayed off for the whole process. The pass is now ended before eval_batch's no_grad."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=_offloaded(ds_config(seed=3)))
    engine.train_batch(batch())

    def ctrl_c(*_):
        raise KeyboardInterrupt
    hook = engine.module.model.layers[1].register_forward_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        engine.module(input_ids=batch()["input_ids"])
    hook.remove()
    engine.eval_batch(batch())
    assert torch.is_grad_enabled() and torch.nn.Linear(2, 2)(torch.ones(2)).requires_grad


def test_a_deep_copy_of_the_model_copies_its_parameters_once():
    """The unit hooks' copies are inert at once: one flush and parameter refresh per unit hook copied an L-layer
    model's parameters about L/2 times again (24 layers: 13.5 times, 9.2 s against 0.7 s), and a copy of one unit
    with offload_dtype converted every offloaded layer into the copy's memo."""
    import copy
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, seed=1))
    engine.train_batch(batch())
    copies = []
    real = torch.Tensor.copy_

    def counting(self, *args, **kwargs):
        copies.append(self.numel())
        return real(self, *args, **kwargs)
    torch.Tensor.copy_ = counting
    try:
        twin = copy.deepcopy(engine.module)
        head = copy.deepcopy(engine.module.lm_head)
    finally:
        torch.Tensor.copy_ = real
    params = sum(p.numel() for p in engine.module.parameters())
    assert sum(copies) <= params          # (the model's own hook refreshes what was copied before its flush, once)
    assert_same_state(twin.state_dict(), engine.module_state_dict())
    assert torch.equal(head.weight, engine.module.lm_head.weight)


def test_with_offload_a_direct_forward_builds_no_graph_and_says_why(caplog):
    """The offloaded layers pass through device buffers that later layers reuse, and autograd cannot see parameters
    pointed at them: gradients through a direct forward came out wrong, silently (18 of 21 on a 5-layer model). The
    forward now runs without autograd, with a warning; without offload it keeps its graph."""
    ids = batch()["input_ids"]
    for offload in (False, True):
        cfg = ds_config(seed=3)
        engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=_offloaded(cfg) if offload else cfg)
        engine.train_batch(batch())
        with caplog.at_level("WARNING"):
            logits = engine.module(input_ids=ids).logits
        assert logits.requires_grad != offload
        assert ("runs without autograd" in caplog.text) == offload
        assert torch.is_grad_enabled()
        with torch.no_grad():
            assert torch.equal(engine.module(input_ids=ids).logits, logits)


@pytest.mark.parametrize("offload", [False, True])
def test_a_unit_called_on_its_own_sees_every_completed_step(offload):
    """model.get_input_embeddings()(ids), the output layer or the final norm called on its own between steps used the
    weights before the last step's update (still pending, fused into the next forward): mixed with a whole-model
    forward (inputs_embeds) it gave logits one step apart. A unit's own call (not a module inside one: call
    engine.flush() first there) applies the pending update first."""
    cfg = ds_config(lr=1e-1, seed=1)
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=_offloaded(cfg) if offload else cfg)
    engine.train_batch(batch())
    plain = tiny_model("llama")
    ids = batch(seed=5)["input_ids"]
    with torch.no_grad():
        emb = engine.module.get_input_embeddings()(ids)
        assert engine.optimizer.pending is None
        plain.load_state_dict(engine.module_state_dict())
        assert torch.equal(emb, plain.get_input_embeddings()(ids))
        engine.train_batch(batch(seed=2))
        h = torch.randn(2, 3, emb.shape[-1])
        head = engine.module.lm_head(h)
        plain.load_state_dict(engine.module_state_dict())
        assert torch.equal(head, plain.lm_head(h))
        engine.train_batch(batch(seed=3))
        norm = engine.module.model.norm(h)
        plain.load_state_dict(engine.module_state_dict())
        assert torch.equal(norm, plain.model.norm(h))


def test_converting_an_offloaded_model_under_its_engine_is_refused_by_name():
    """model.half() under a live engine with offload converted the resident units but not the offloaded layers'
    store, and every later step or forward failed with a dtype mismatch inside a matmul. The next use names it."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=_offloaded(ds_config(seed=3)))
    engine.train_batch(batch())
    engine.module.half()
    for use in (lambda: engine.train_batch(batch()), lambda: engine.eval_batch(batch()),
                lambda: engine.module(input_ids=batch()["input_ids"])):
        with pytest.raises(RuntimeError, match=r"model.embed_tokens.weight is torch.float16 on cpu, but was "
                                               r"torch.float32 on cpu when the engine was built: the model was "
                                               r"converted under a live engine with parameter offload"):
            use()
