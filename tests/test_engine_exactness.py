"""ZOEngine against a plain MeZO loop (tests/reference.py): losses, projected gradients and parameters."""
import copy
import math
import types

import pytest
import torch

import ds_zo
from ds_zo.model.perturbed_copies import OUTPUT_ROLE
from ds_zo.model.streamed import streamed_kind
from ds_zo.perturb import PerturbationGenerator, param_key
from ds_zo.replay import read_step_log, replay, write_step_log
from conftest import ds_config
from models import ARCHS, assert_same_state, batch, tiny_model
from reference import MeZOReference

STEPS = 3


def _engine(model, **kw):
    engine, optimizer, _, _ = ds_zo.initialize(model=model, config=ds_config(**kw))
    return engine


def _offloading(cfg, offload=True):
    """cfg with DeepSpeed's parameter offload to the CPU (ds_zo's pipeline: the decoder layers) where `offload`."""
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu"}}
    return cfg


def _steps_match_reference(engine, ref, b, steps=2):
    """`steps` ZO steps on batch b: each loss and projected gradient MeZO's, then the parameters."""
    for _ in range(steps):
        loss = engine.train_batch(b)
        ref_loss, ref_g = ref.step(b)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        g = engine.last_projected_grad
        assert (g if isinstance(g, list) else [g]) == pytest.approx(ref_g, rel=1e-5)
    _assert_params_equal(engine, ref)


def _assert_params_equal(engine, ref, rtol=1e-5):
    sd = engine.module_state_dict()
    for n, p in ref.params().items():
        torch.testing.assert_close(sd[n], p, rtol=rtol, atol=0, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("arch", ARCHS + ["bloom"])
@pytest.mark.parametrize("tied", [True, False])
def test_matches_plain_mezo_loop(arch, tied):
    model = tiny_model(arch, tied)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    engine = _engine(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    b = batch()
    for t in range(STEPS):
        loss = engine.train_batch(b)
        ref_loss, ref_g = ref.step(b)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert engine.last_projected_grad == pytest.approx(ref_g[0], rel=1e-5)
    assert engine.global_steps == STEPS
    # the loss is HF's own definition: agrees with the model's float32 `.loss` to float32 rounding
    assert engine.eval_batch(b) == pytest.approx(ref.hf_loss(b), rel=1e-6)
    _assert_params_equal(engine, ref)
    assert engine.eval_batch(b) == pytest.approx(ref.loss(b), rel=1e-5)


@pytest.mark.parametrize("rows, heads, q, offload", [(1, 2, 1, False), (2, 4, 1, False), (1, 4, 2, False),
                                                     (2, 4, 1, True)])
def test_mpt_alibi_bias_is_not_cut_like_rows(rows, heads, q, offload):
    """MPT hands every layer one (heads, 1, max_seq_len) ALiBi bias. Where heads == 2 * q * rows its first dimension
    looks like the doubled batch: it was cut as rows, so each sign saw one head's slopes (with one row, silently:
    g 2.373 against 2.379) or the layer crashed. Now it goes to every slot whole and the step is MeZO's."""
    model = tiny_model("mpt", heads=heads)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.0, seed=3, q=q)
    cfg = _offloading(ds_config(lr=1e-2, eps=1e-3, seed=3, micro=rows, num_perturbations=q), offload)
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    assert (engine.pipeline is not None) == offload
    b = batch(rows=rows)
    _steps_match_reference(engine, ref, b)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("arch", ["blenderbot_small", "marian"])
def test_position_embeddings_made_from_a_shape_take_each_slots_weights(arch, offload):
    """BlenderbotSmall's (learned) and Marian's (sinusoidal, frozen) position embeddings are called with the input's
    shape and return (T, D): the slots' outputs were concatenated to (2T, D) and the step crashed. Each slot's now
    reaches its own rows ((2 x rows, T, D), broadcast as (T, D) was), and the step is MeZO's."""
    model = tiny_model(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("embed_positions.weight" in " ".join(trainable)) == (arch == "blenderbot_small")
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.0, seed=3, trainable=trainable)
    cfg = _offloading(ds_config(lr=1e-2, eps=1e-3, seed=3), offload)
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    assert (engine.pipeline is not None) == offload
    b = batch()
    _steps_match_reference(engine, ref, b)


class _UnbatchedUnitsLM(torch.nn.Module):
    """A tiny causal LM (MLP blocks) whose extra unit is called with no tensor of the batch."""

    class Registers(torch.nn.Module):            # learned (1, R, D) tokens, handed back as the parameter itself
        def __init__(self):
            super().__init__()
            self.r = torch.nn.Parameter(torch.randn(1, 3, 16) * 0.1)

        def forward(self):
            return self.r

    class Vector(torch.nn.Module):               # (D,), added to every position
        def __init__(self):
            super().__init__()
            self.v = torch.nn.Parameter(torch.randn(16) * 0.1)

        def forward(self):
            return self.v

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.wte = torch.nn.Embedding(96, 16)
        self.extra = {"positions": lambda: torch.nn.Embedding(64, 16), "registers": self.Registers,
                      "vector": self.Vector}[kind]()
        self.h = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16),
                                                          torch.nn.GELU()) for _ in range(2)])
        self.head = torch.nn.Linear(16, 96, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        x = self.wte(input_ids)
        if self.kind == "positions":                 # nanoGPT's wpe(arange(T)): (T, D)
            x = x + self.extra(torch.arange(input_ids.shape[1]))
        elif self.kind == "registers":
            x = torch.cat([self.extra().expand(x.shape[0], -1, -1), x], dim=1)
        else:
            x = x + self.extra()
        for block in self.h:
            x = x + block(x).cumsum(1) / 8           # causal mixing of positions
        logits = self.head(x)
        return types.SimpleNamespace(logits=logits[:, 3:] if self.kind == "registers" else logits)


@pytest.mark.parametrize("kind", ["positions", "registers"])
def test_units_called_without_the_batch_take_each_slots_weights(kind):
    """nanoGPT's wpe(arange(T)) returns (T, D) and crashed (the slots' outputs concatenated to (2T, D)); register
    tokens (1, R, D) handed back as the parameter itself were read after it pointed back at the master (g -0.935
    against -1.056, silently). Both are MeZO's step now."""
    torch.manual_seed(0)
    model = _UnbatchedUnitsLM(kind)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.0, seed=3)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    b = batch()
    _steps_match_reference(engine, ref, b)


def test_a_vector_from_a_unit_called_without_the_batch_is_refused_by_name():
    """A trained unit that returns (D,) from a call given nothing of the batch: stacked per slot to (2 x rows, D) it
    met the positions wherever T == 2 x rows, silently wrong. Refused, naming the unit; frozen, it trains."""
    torch.manual_seed(0)
    model = _UnbatchedUnitsLM("vector")
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    with pytest.raises(RuntimeError, match=r"extra \(Vector\) returned a \(16,\) output for each of ds_zo's 2 slots"):
        engine.train_batch(batch())
    engine.destroy()
    model.extra.v.requires_grad_(False)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    assert math.isfinite(engine.train_batch(batch()))


def test_offload_with_the_layers_inside_a_frozen_module_says_why_none_is_offloaded():
    """The layers inside a frozen module that owns a parameter: it becomes one resident unit, so the default offload
    (the layers) has nothing to move. The message blamed zero_order.resident_units, which was not set."""
    from ds_zo.config import ConfigError

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(16))
            self.h = torch.nn.ModuleList([torch.nn.Linear(16, 64) for _ in range(2)])    # the largest list

    torch.manual_seed(0)
    model = _UnbatchedUnitsLM("positions")
    model.body = Body()
    for p in model.body.parameters():
        p.requires_grad_(False)
    cfg = _offloading(ds_config(lr=1e-2, eps=1e-3, seed=3))
    with pytest.raises(ConfigError, match=r"no unit is offloaded: by default the decoder layers are, and this model "
                                          r"has none as units .*units: \['wte', 'extra', 'h\.0\.0', 'h\.0\.1', 'h\.1\.0'"):
        ds_zo.initialize(model=model, config=cfg)


@pytest.mark.parametrize("offload", [False, True])
def test_a_multimodal_model_trains_its_language_model_on_text(offload):
    """Llava with its vision tower frozen, fed text only: the tower's modules that own parameters and contain others
    (CLIP's embeddings) were refused as nested units. Frozen, each is one unit of its subtree, never perturbed, and
    the step is MeZO's on the language model."""
    import transformers
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=90))
    for n, p in model.named_parameters():
        p.requires_grad_(not ("vision_tower" in n or "projector" in n))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.0, seed=3, trainable=trainable)
    cfg = _offloading(ds_config(lr=1e-2, eps=1e-3, seed=3), offload)
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    b = batch()
    _steps_match_reference(engine, ref, b)
    frozen = {n: p for n, p in engine.module_state_dict().items() if "vision_tower" in n}
    assert frozen and all(torch.equal(p, ref.params()[n]) for n, p in frozen.items())


def test_params_actually_move_and_every_trainable_parameter_takes_the_spsa_step():
    """What an outside checker does: reconstruct z from the change and g, compare with the generator."""
    model = tiny_model("llama")
    engine = _engine(model, lr=1e-2, eps=1e-3, wd=0.0, seed=4)
    before = {n: p.clone() for n, p in engine.module_state_dict().items()}
    engine.train_batch(batch())
    g = engine.last_projected_grad
    after = engine.module_state_dict()
    gen = PerturbationGenerator()
    seed = engine.step_log[-1].seed
    canonical = {n for n, _ in engine.module.named_parameters()}  # lm_head.weight is an alias of the tied embedding
    assert "lm_head.weight" in after and "lm_head.weight" not in canonical
    for n, p in before.items():
        if n not in canonical:
            assert torch.equal(after[n], after["model.embed_tokens.weight"])
            continue
        z = gen.z(seed, 0, param_key(n), p.numel()).view_as(p)
        torch.testing.assert_close(after[n], p - 1e-2 * g * z, rtol=1e-5, atol=1e-7)
        assert not torch.equal(after[n], p)


@pytest.mark.parametrize("fuse", [True, False])
def test_fused_and_eager_updates_agree(fuse):
    model = tiny_model("qwen2")
    ref = MeZOReference(model, lr=5e-3, eps=1e-3, wd=0.05, seed=1)
    engine = _engine(model, lr=5e-3, eps=1e-3, wd=0.05, seed=1, fuse_update=fuse)
    b = batch()
    for _ in range(STEPS):
        engine.train_batch(b)
        ref.step(b)
    if not fuse:  # eager: the module's own parameters are current without any flush
        assert engine.optimizer.pending is None
    _assert_params_equal(engine, ref)


def test_pending_update_is_never_visible():
    model = tiny_model("llama")
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, seed=2)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=2)
    b = batch()
    engine.train_batch(b)
    ref.step(b)
    assert engine.optimizer.pending is not None  # fused: the update waits for the next forward ...
    # ... but every way of looking at the model sees it
    sd = engine.module.state_dict()
    assert engine.optimizer.pending is None
    for n, p in ref.params().items():
        assert torch.equal(sd[n], p)
    engine.train_batch(b)
    ref.step(b)
    with torch.no_grad():
        logits = engine.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # direct forward
        ref_logits = ref.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(logits, ref_logits)
    engine.train_batch(b)
    ref.step(b)
    assert engine.eval_batch(b) == ref.loss(b)


def test_master_is_never_perturbed_in_place():
    model = tiny_model("opt")
    engine = _engine(model, lr=0.0, eps=1e-1, seed=5)
    masters = {n: (p.data_ptr(), p.detach().clone()) for n, p in engine.module.named_parameters()}
    seen_during_forward = []

    def check(_module, _inputs):
        # while the dual forward runs, the stored parameters hold exactly the master values
        for n, p in engine.module.named_parameters():
            if p.data_ptr() == masters[n][0]:
                seen_during_forward.append(torch.equal(p, masters[n][1]))
    hooks = [u.module.register_forward_pre_hook(check) for u in engine.units]
    for _ in range(3):
        engine.train_batch(batch())
    for h in hooks:
        h.remove()
    assert seen_during_forward and all(seen_during_forward)
    for n, p in engine.module_state_dict(keep_vars=True).items():
        if n in masters:
            assert p.data_ptr() == masters[n][0] and torch.equal(p, masters[n][1])  # lr = 0: bitwise unchanged


def test_n_spsa_is_the_mean_of_single_seed_estimates():
    model = tiny_model("llama")
    b = batch()
    base = copy.deepcopy(model)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=6, num_perturbations=2)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, seed=6, q=2)
    loss = engine.train_batch(b)
    ref_loss, ref_g = ref.step(b)
    assert engine.last_projected_grad == pytest.approx(ref_g, rel=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_params_equal(engine, ref)
    # the same update as averaging two single-perturbation steps taken from the same starting point
    gen = PerturbationGenerator()
    seed = engine.step_log[0].seed
    for n, p0 in base.named_parameters():
        single = [p0 - 1e-2 * g * gen.z(seed, j, param_key(n), p0.numel()).view_as(p0) for j, g in enumerate(ref_g)]
        torch.testing.assert_close(engine.module_state_dict()[n], (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-7)


def test_micro_batching_does_not_change_the_step():
    """The loss is the token mean over the whole batch accumulated in float64, however the batch is cut."""
    model = tiny_model("gpt2")
    b = batch(rows=4)
    whole = _engine(copy.deepcopy(model), lr=1e-2, seed=7, micro=4)
    split = _engine(copy.deepcopy(model), lr=1e-2, seed=7, micro=1)
    for _ in range(STEPS):
        lw, ls = whole.train_batch(b), split.train_batch(b)
        assert ls == pytest.approx(lw, rel=1e-5)
        assert split.last_projected_grad == pytest.approx(whole.last_projected_grad, rel=1e-5)
    a, c = whole.module_state_dict(), split.module_state_dict()
    for n in a:
        torch.testing.assert_close(c[n], a[n], rtol=1e-5, atol=0)


def test_frozen_parameters_are_untouched():
    """Only the parameters a pattern names that require grad move (a frozen one the pattern also names stays)."""
    model = tiny_model("llama", tied=False)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(seed=1, trainable=["*.layers.1.*"]))
    before = {n: p.clone() for n, p in engine.module_state_dict().items()}
    for _ in range(2):
        engine.train_batch(batch())
    after = engine.module_state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".layers.1." in n for n in moved)
    assert {n for n in before if ".layers.1." in n} - {"model.layers.1.mlp.down_proj.weight"} == moved
    # the reference with the same trainable set agrees
    ref = MeZOReference(tiny_model("llama", tied=False), lr=1e-2, eps=1e-3, seed=1, trainable=moved)
    for _ in range(2):
        ref.step(batch())
    for n, p in ref.params().items():
        torch.testing.assert_close(after[n], p, rtol=1e-5, atol=0)


def test_lr_schedule_drives_the_update():
    model = tiny_model("llama")
    cfg = ds_config(lr=1e-2, seed=2)
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                       "warmup_num_steps": 4, "warmup_type": "linear"}}
    engine, _, _, scheduler = ds_zo.initialize(model=model, config=cfg)
    assert scheduler is not None
    lrs = []
    ref = MeZOReference(model, lr=0.0, eps=1e-3, seed=2)
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        engine.train_batch(batch())
        ref.lr = lrs[-1]
        ref.step(batch())
    assert [r.lr for r in engine.step_log] == lrs  # each step used the lr the scheduler set for it
    assert lrs == sorted(lrs) and lrs[-1] > lrs[-2] > lrs[-3] > 0  # linear warmup
    _assert_params_equal(engine, ref)


def test_step_log_replays_to_the_same_parameters(tmp_path):
    base = tiny_model("opt", tied=False)
    engine = _engine(copy.deepcopy(base), lr=1e-2, wd=0.1, seed=9, num_perturbations=2)
    for i in range(STEPS):
        engine.train_batch(batch(seed=i))
    path = tmp_path / "steps.jsonl"
    write_step_log(path, engine.step_log)
    rebuilt = replay(copy.deepcopy(base), read_step_log(path))
    sd = engine.module_state_dict()
    for n, p in rebuilt.named_parameters():
        assert torch.equal(p, sd[n]), n


def test_bf16_update_is_computed_in_fp32_and_rounded_once():
    model = tiny_model("llama")
    cfg = ds_config(lr=1e-2, seed=3)
    cfg["bf16"] = {"enabled": True}
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    before = {n: p.clone() for n, p in engine.module_state_dict().items()}
    assert all(p.dtype == torch.bfloat16 for p in before.values())
    engine.train_batch(batch())
    g, seed = engine.last_projected_grad, engine.step_log[0].seed
    assert g == g and g != 0  # finite, nonzero
    gen = PerturbationGenerator()
    sd = engine.module_state_dict()
    for n, _ in engine.module.named_parameters():
        p = sd[n]
        z = gen.z(seed, 0, param_key(n), p.numel()).view_as(p)
        expected = (before[n].float() - 1e-2 * (g * z)).bfloat16()
        assert torch.equal(p, expected), n


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_rows_train_only_those_rows(tied):
    """MeZO on a few rows of the (tied) embedding: the issue-5 default recipe (label-word rows)."""
    model = tiny_model("llama", tied)
    base = copy.deepcopy(model)
    rows = [3, 17, 40]
    cfg = ds_config(lr=1e-2, eps=1e-2, wd=0.1, seed=8, trainable_rows={"model.embed_tokens.weight": rows})
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    ref = MeZOReference(base, lr=1e-2, eps=1e-2, wd=0.1, seed=8,
                        rows={"model.embed_tokens.weight": torch.tensor(rows)})
    for t in range(STEPS):
        loss = engine.train_batch(batch(seed=t))
        ref_loss, ref_g = ref.step(batch(seed=t))
        assert loss == pytest.approx(ref_loss, rel=1e-9)
        assert engine.last_projected_grad == pytest.approx(ref_g[0], rel=1e-6)
    after = engine.module_state_dict()
    _assert_params_equal(engine, ref)
    emb = after["model.embed_tokens.weight"]
    start = base.model.embed_tokens.weight
    changed = (emb != start).any(dim=1).nonzero().flatten().tolist()
    assert changed == rows
    for n, p in base.named_parameters():
        if n != "model.embed_tokens.weight":
            assert torch.equal(after[n], p), n
    rebuilt = replay(copy.deepcopy(base), engine.step_log, trainable=["model.embed_tokens.weight"],
                     rows={"model.embed_tokens.weight": torch.tensor(rows)})
    assert torch.equal(rebuilt.model.embed_tokens.weight, emb)


def test_trainable_rows_errors():
    from ds_zo.config import ConfigError
    with pytest.raises(ConfigError, match="matches no parameter"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(trainable_rows={"nope.*": [1]}))
    with pytest.raises(ConfigError, match="not rows of"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(trainable_rows={"*embed_tokens*": [1000]}))


def test_trainable_patterns_that_select_nothing_are_refused_by_name():
    """A `trainable` pattern that matches no parameter (a typo, a model it was not written for), or only frozen
    ones, is refused naming it: it was silently ignored where another pattern matched, and a pattern matching only
    frozen parameters was reported as matching nothing. A pattern matching frozen and trainable parameters trains
    those that require grad (the README's rule), and a model with every parameter frozen is refused as such."""
    from ds_zo.config import ConfigError
    with pytest.raises(ConfigError, match=r"pattern '\*layrs\.0\*' matches no parameter .* such as model.embed"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(trainable=["*layers.1*", "*layrs.0*"]))
    frozen = tiny_model("llama")
    frozen.model.layers[0].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"pattern '\*layers.0\*' matches only parameters with requires_grad=False "
                                          r"\(9 of them\)"):
        ds_zo.initialize(model=frozen, config=ds_config(trainable=["*layers.0*"]))
    engine, *_ = ds_zo.initialize(model=frozen, config=ds_config(trainable=["*layers.*"]))
    assert engine.trainable_names == {n for n, p in frozen.named_parameters() if "layers." in n and p.requires_grad}
    engine.destroy()
    frozen.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter of the model has requires_grad=False"):
        ds_zo.initialize(model=frozen, config=ds_config())


def test_classification_batches_score_only_the_label_position():
    """Left-padded prompt-classification batches (one labelled token, last) use logits_to_keep; the loss, g and
    parameters still match the reference, which computes every position's logits."""
    b = batch(rows=3, seq=12)
    b["labels"] = torch.full_like(b["input_ids"], -100)
    b["labels"][:, -1] = b["input_ids"][:, -1]
    model = tiny_model("llama")
    ref = MeZOReference(model, lr=1e-2, eps=1e-2, seed=2)
    engine = _engine(model, lr=1e-2, eps=1e-2, seed=2, micro=3)
    assert engine.scored_positions(b["labels"])[0] == {"logits_to_keep": 2}
    for _ in range(STEPS):
        loss = engine.train_batch(b)
        ref_loss, ref_g = ref.step(b)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert engine.last_projected_grad == pytest.approx(ref_g[0], rel=1e-4)
    # the output matmul over 2 positions rounds differently from the one over 12 (last bits, magnified by 1/2ε)
    sd = engine.module_state_dict()
    for n, p in ref.params().items():
        torch.testing.assert_close(sd[n], p, rtol=1e-5, atol=1e-6)


def test_label_word_loss_is_cross_entropy_over_candidates():
    from ds_zo.loss import LabelWordLoss
    b = batch(rows=3, seq=12)
    b["labels"] = torch.full_like(b["input_ids"], -100)
    b["labels"][:, -1] = torch.tensor([5, 9, 5])
    candidates = [5, 9]
    model = tiny_model("llama")
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=0.0, eps=1e-2, seed=2, micro=3),
                                  loss_fn=LabelWordLoss(candidates))
    with torch.no_grad():
        logits = copy.deepcopy(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, -2][:, candidates], torch.tensor([0, 1, 0]))
    assert engine.eval_batch(b) == pytest.approx(expected.item(), rel=1e-6)
    engine.train_batch(b)   # a ZO step with the custom loss runs (g finite)
    assert engine.last_projected_grad == engine.last_projected_grad


@pytest.mark.parametrize("span_chunks", [1, 3, 8])
@pytest.mark.parametrize("tied", [True, False])
def test_spans_of_several_chunks_change_nothing(monkeypatch, tied, span_chunks):
    """Accelerators work on ACCELERATOR_SPAN_CHUNKS chunks per element-wise pass (perturbation, update, whole-weight
    row blocks): the same scheduling forced on CPU, with spans of 1, 3 and 8 chunks, reproduces the reference bit for
    bit, and each z chunk is still drawn once per unit visit."""
    monkeypatch.setattr(PerturbationGenerator, "span", lambda self, device: self.chunk * span_chunks)
    monkeypatch.setattr(PerturbationGenerator, "pass_elements", lambda self, device: self.span(device))
    model = tiny_model("llama", tied)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    ref.gen = PerturbationGenerator(chunk_elements=100)
    engine = _engine(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    engine.perturbations.chunk = 100
    for t in range(STEPS):
        drawn = engine.perturbations.elements_drawn
        assert engine.train_batch(batch(seed=t)) == ref.step(batch(seed=t))[0]
        per_step = engine.perturbations.elements_drawn - drawn
        # the perturbation draws every parameter once per unit (a tied weight in both units, less the chunks the
        # embedding's row blocks leave in the ε·z cache for the head), the update once (from step 1)
        params = sum(p.numel() for p in model.parameters())
        tied_numel = model.get_input_embeddings().weight.numel() if tied else 0
        assert params + tied_numel - 4 * 100 <= per_step - (params if t else 0) <= params + tied_numel
    _assert_params_equal(engine, ref, rtol=0)
    # the update and the working copies' ε·z share one span of scratch
    assert [b.numel() for b in engine.perturbations._spans[(torch.device("cpu"), None)]] == [100 * span_chunks]
    assert "z" not in {k[0] for k in engine.copies.buffers._bufs}


@pytest.mark.parametrize("chunk, share, span_chunks", [(2000, 1, 4), (1000, 1, 8), (100, 64, 2)])
def test_the_accelerator_span_is_sized_by_the_largest_decoder_layer_and_the_model(monkeypatch, chunk, share,
                                                                                   span_chunks):
    """The engine caps the accelerator span (`accelerator_span_chunks`) by the model's largest decoder layer, trained
    or not (the tiny llama's: 7744 parameters), and by 1/SPAN_MODEL_SHARE of the whole model (18,592 parameters, the
    tied embedding counted once): 4 chunks of 2000 and 8 (the most) of 1000 with the model's cap out of the way
    (share 1); 2 chunks of 100 at the share of 64 (18,592 // 6,400), where the layer would allow 8. Here only the
    tied embedding and the final norm are trained, which alone would not say how large the model is."""
    import ds_zo.perturb
    monkeypatch.setattr(PerturbationGenerator.__init__, "__defaults__", ("gaussian", chunk, "auto"))
    monkeypatch.setattr(ds_zo.perturb, "SPAN_MODEL_SHARE", share)
    cfg = ds_config(trainable=["model.embed_tokens.*", "model.norm.*"])
    engine, *_ = ds_zo.initialize(model=tiny_model("llama", tied=True), config=cfg)
    assert engine.perturbations.chunk == chunk
    assert max(sum(p.numel() for p in layer.parameters()) for layer in engine.module.model.layers) == 7744
    assert sum(p.numel() for p in engine.module.parameters()) == 18592
    assert engine.perturbations.accelerator_span_chunks == span_chunks
    engine.train_batch(batch(seed=0))
    assert engine.last_projected_grad == engine.last_projected_grad        # a step runs (g finite)


@pytest.mark.parametrize("threads", [1, 2])
def test_tied_weight_z_drawn_once_per_perturbation(threads):
    """A tied embedding/output weight on CPU: the embedding forms only the rows its ids use, from the z of those
    rows alone (the vectorised sampler skips the rest of each chunk), and the output layer draws each chunk around
    the rows kept for it. The parameters are still the reference's bit for bit (chunks of 528 values: rows of 32
    straddle chunk boundaries; the output layer's row blocks are larger than its ε·z cache, so its chunks are drawn
    span by span), and every z value is drawn exactly twice per step (perturbation and update). Forming whole row
    blocks in the embedding, as other devices do, draws some of its chunks again in the output layer."""
    from test_native import _has_avx2_fma, needs_native
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_model("llama", tied=True)
        trained = sum(p.numel() for p in model.parameters())
        ref = MeZOReference(copy.deepcopy(model), lr=1e-2, eps=1e-3, wd=0.1, seed=3)
        ref.gen = PerturbationGenerator(chunk_elements=528)
        drawn = {}
        for rows_only in (True, False):
            engine = _engine(copy.deepcopy(model), lr=1e-2, eps=1e-3, wd=0.1, seed=3)
            engine.perturbations.chunk = 528
            if not rows_only:
                engine.copies.shared = set()          # the row-block path, for comparison
            drawn[rows_only] = []
            for t in range(STEPS):
                start = engine.perturbations.elements_drawn
                loss = engine.train_batch(batch(seed=t))
                if rows_only:
                    assert loss == ref.step(batch(seed=t))[0]
                drawn[rows_only].append(engine.perturbations.elements_drawn - start)
            if rows_only:
                _assert_params_equal(engine, ref, rtol=0)
                assert engine.copies._row_ez           # the embedding kept its rows' ε·z for the output layer
        assert drawn[True] == [trained] + [2 * trained] * (STEPS - 1)   # step 0 has no pending update
        assert all(a > b for a, b in zip(drawn[False], drawn[True]))
    finally:
        torch.set_num_threads(before)


def test_untied_embedding_draws_only_its_ids_rows():
    """An embedding not shared with another unit: on CPU its working copies are only the rows its ids use, and only
    those rows' z is drawn to perturb it (the rest of the weight's z is drawn by the update alone). Bit for bit the
    reference; the perturbation's draws counted exactly."""
    from test_native import _has_avx2_fma, needs_native
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    model = tiny_model("llama", tied=False)
    ref = MeZOReference(copy.deepcopy(model), lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    ref.gen = PerturbationGenerator(chunk_elements=528)
    engine = _engine(copy.deepcopy(model), lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    engine.perturbations.chunk = 528
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    for t in range(STEPS):
        start = engine.perturbations.elements_drawn
        assert engine.train_batch(batch(seed=t)) == ref.step(batch(seed=t))[0]
        used = torch.unique(batch(seed=t)["input_ids"]).numel() * emb.shape[1]
        perturbation = params - emb.numel() + used
        assert engine.perturbations.elements_drawn - start == perturbation + (params if t else 0)
    _assert_params_equal(engine, ref, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_spanning_many_z_chunks(tied):
    """With a small z chunk every parameter spans many chunks: the chunked perturbation and update (bounded
    scratch memory) still reproduce the reference exactly, bf16 rounding included via the fp32 path."""
    model = tiny_model("llama", tied)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    ref.gen = PerturbationGenerator(chunk_elements=100)
    engine = _engine(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    engine.perturbations.chunk = 100          # shared by the perturbed copies and the optimizer
    for t in range(STEPS):
        assert engine.train_batch(batch(seed=t)) == ref.step(batch(seed=t))[0]
    _assert_params_equal(engine, ref, rtol=0)
    # scratch: one span the update (one perturbation: no second z scratch) and the copies' ε·z share, two slot
    # buffers of the largest unit formed whole (a decoder layer; freed while the output layer computes, so absent
    # after a step) and, for the embedding and the head (formed in row blocks), two block buffers and at most one
    # span and one chunk of cached ε·z (the 64-row blocks here are larger than that: only the chunks they share with
    # a neighbour are cached) -- no scratch of vocabulary size, and no logits: the output layer hands its blocks to
    # the loss (StreamedTokenLoss)
    span = engine.perturbations.span(torch.device("cpu"))   # chunks drawn at once: 100 x min(threads, 4)
    cached = span + 100
    assert span % 100 == 0
    assert [b.numel() for b in engine.perturbations._spans[(torch.device("cpu"), None)]] == [span]
    streamed = [u for u in engine.units if streamed_kind(u)]
    assert {streamed_kind(u) for u in streamed} == {"embedding", "linear"}
    block = max(min(engine.copies.block_rows(u.trainable[0]), u.trainable[0].param.shape[0])
                * u.trainable[0].param.shape[1] for u in streamed)
    assert engine.copies.buffers.nbytes(OUTPUT_ROLE) == 0
    held = engine.copies.buffers.nbytes() - 2 * 4 * block
    assert 4 * 100 <= held <= 4 * cached
    largest = max(sum(r.param.numel() for r in u.trainable) for u in engine.units if u not in streamed)
    layer = next(u for u in engine.units if u.is_layer)
    engine.copies.acquire(layer)
    engine.copies.release(layer)
    assert engine.copies.buffers.nbytes() == 2 * 4 * largest + 2 * 4 * block + held


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_scored_positions_are_one_choice_per_step_whatever_the_micro_batches(arch):
    """Ragged label tails (one label per row at positions -1, -3, -6 of right-padded rows): every micro-batch of a
    step scores the same positions (the most any of them needs), so one batch of 3 rows and 3 micro-batches of one
    row give the same g bit for bit (a choice per micro-batch gave OPT 1.4e-5 relative apart: its output matmul
    over another number of positions rounds differently). One thread: with more, the matmuls of a 3-row and a
    1-row micro-batch may split their work differently and round differently anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _one_choice_per_step(arch)
    finally:
        torch.set_num_threads(before)


def _one_choice_per_step(arch):
    b = batch(rows=3, seq=32)
    b["labels"] = torch.full_like(b["input_ids"], -100)
    for row, pos in enumerate((-1, -3, -6)):
        b["labels"][row, pos] = b["input_ids"][row, pos]
    gs = []
    for micro in (3, 1):
        cfg = ds_config(lr=1e-2, eps=1e-3, seed=2, micro=micro)
        cfg["gradient_accumulation_steps"] = 3 // micro
        engine, *_ = ds_zo.initialize(model=tiny_model(arch), config=cfg)
        parts = [{k: v[i:i + micro] for k, v in b.items()} for i in range(0, 3, micro)]
        assert engine.kept_positions([p["labels"] for p in parts]) == 7
        engine.train_batch(data_iter=iter(parts))
        gs.append(engine.last_projected_grad)
    assert gs[0] == gs[1]


def test_an_moe_model_trains_on_the_token_loss_without_its_router_loss():
    """With config.output_router_logits, HF adds a load-balancing loss over the router logits of the whole batch; a
    ZO step trains on the token loss (the router outputs of its slots would not line up: the step crashed)."""
    model = tiny_model("mixtral")
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, seed=3)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    b = batch()
    _steps_match_reference(engine, ref, b)
    assert engine.eval_batch(b) == pytest.approx(ref.loss(b), rel=1e-5)
    assert ref.hf_loss(b) > ref.loss(b) + 1e-3                 # HF's includes the router loss


def test_a_unit_that_fails_on_a_row_block_is_named_with_its_inputs():
    """A model whose layers carry the batch in another dimension fails inside HF code: the error names the unit,
    the block and the shapes it was given."""
    model = tiny_model("llama")
    layer = model.model.layers[1]
    plain = layer.forward                      # a layer that cannot take a block of rows (as Gemma3n's cannot)
    layer.forward = lambda hidden_states, *a, **kw: plain(hidden_states + torch.ones(7, 1, 1), *a, **kw)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    with pytest.raises(RuntimeError, match=r"model\.layers\.1 \(LlamaDecoderLayer\) failed on row block 0 of 2 .*"
                                           r"cutting every tensor whose first dimension is 4; this unit's inputs "
                                           r"were arg\(4, 8, 32\), attention_mask"):
        engine.train_batch(batch())


def test_out_of_memory_in_a_unit_keeps_its_type():
    """Code that catches out-of-memory (to retry with a smaller batch) must still see it: not a DualForwardError."""
    from ds_zo.model.dual_forward import DualForwardError
    model = tiny_model("llama")
    layer = model.model.layers[0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")
    layer.forward = out_of_memory
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    with pytest.raises(torch.OutOfMemoryError) as error:
        engine.train_batch(batch())
    assert not isinstance(error.value, DualForwardError)


class _AutocastReference(MeZOReference):
    """The reference's forwards under CPU autocast (its perturbed weights are new tensors every time, so autocast's
    cast cache, which holds only parameters' casts, does not touch them)."""

    dtype = torch.bfloat16

    def loss(self, batch, shifts=None) -> float:
        with torch.autocast("cpu", dtype=self.dtype):
            return super().loss(batch, shifts)


@pytest.mark.parametrize("row_blocks,offload,dtype", [("auto", False, "bfloat16"), ("off", False, "bfloat16"),
                                                      ("auto", True, "bfloat16"), ("off", True, "bfloat16"),
                                                      ("auto", False, "float16")])
def test_torch_autocast_applies_to_each_slot_with_its_own_weights(row_blocks, offload, dtype):
    """ds_config's torch_autocast runs the ZO forwards in bf16, as DeepSpeedEngine.forward runs its forward. Autocast
    caches each parameter's bf16 cast; the slots of a ZO forward point one parameter at two working copies, so with
    the cache on the θ−εz slot computed with θ+εz's weights (g −0.81 against the reference's −1.93), and the streamed
    output layer ignored autocast (its torch.mm writes into a float32 window). With float16, DeepSpeed's stage-0 grad
    scaler, stepped by the lr-schedule bookkeeping, failed every step after recording it."""
    model = tiny_model("llama")
    ref = _AutocastReference(model, lr=1e-2, eps=1e-2, seed=3)
    ref.dtype = getattr(torch, dtype)
    cfg = _offloading(ds_config(lr=1e-2, eps=1e-2, seed=3, row_blocks=row_blocks), offload)
    cfg["torch_autocast"] = {"enabled": True, "dtype": dtype}
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    dtypes = set()
    hook = engine.module.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    _steps_match_reference(engine, ref, batch())
    hook.remove()
    assert dtypes == {ref.dtype} and engine.global_steps == 2


def test_a_callers_autocast_region_around_steps_sees_each_step_in_its_forwards():
    """A caller's CPU autocast (DeepSpeed's context lets it through on CPU) around direct forwards and train_batch:
    autocast's cast cache held the weights' casts from before the step, so the forward after it computed with the
    old matrices and the new embeddings and norms. Every update (the fused one inside the next forward, a flush)
    clears it."""
    engine = _engine(tiny_model("llama"), lr=1e-2, eps=1e-3, seed=3)
    b = batch()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.module(**inputs)
        engine.train_batch(b)
        engine.train_batch(b)
        inside = engine.module(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = engine.module(**inputs).logits
    assert torch.equal(inside, fresh)


def test_weight_decay_edited_between_steps_is_applied_and_replayed():
    """A weight_decay set by hand on the matrices' group between steps (as one sets an lr) is the next step's: the
    matrices decay by it and a replay of the step log rebuilds the run. The groups' values used to be cached at the
    first step, so an edit after it was recorded in the step log but never applied. Setting it on every group (the
    usual loop) would decay 1-D tensors, which a step's one recorded value never does: refused by name, before the
    step's forwards, with nothing changed."""
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, seed=3)
    engine = _engine(model, lr=1e-2, eps=1e-3, seed=3)
    b = batch()
    _steps_match_reference(engine, ref, b)
    matrices, = [g for g in engine.optimizer.param_groups if g["params"][0].dim() >= 2]
    matrices["weight_decay"] = ref.wd = 0.5
    _steps_match_reference(engine, ref, b)
    assert [r.wd for r in engine.step_log] == [0.0, 0.0, 0.5, 0.5]
    state = engine.module_state_dict()
    assert_same_state(replay(base, engine.step_log).state_dict(), state)
    matrices["weight_decay"] = 0.0
    engine.optimizer.param_groups[1]["weight_decay"] = 0.5       # (the message names this edit, not the matrices)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: weight_decay 0.5 on a parameter "
                                         r"'model\.[\w.]*norm\.weight' of rank 1"):
        engine.train_batch(b)
    for g in engine.optimizer.param_groups:
        g["weight_decay"] = 0.5
    with pytest.raises(ValueError, match=r"param_groups\[1\]: weight_decay 0.5 on a parameter "
                                         r"'model\.[\w.]*norm\.weight' of rank 1; ds_zo decays exactly the matrices"):
        engine.train_batch(b)
    assert engine.global_steps == 4
    assert_same_state(engine.module_state_dict(), state)


def test_a_step_refused_for_its_groups_draws_no_micro_batch():
    """A train_batch refused because the groups were edited against the decay rule changes nothing, not even the
    engine's place in its dataloader: it used to draw its micro-batches first, so the run went on with other batches
    than the uninterrupted one (and than a resume from a checkpoint)."""
    rows = [{k: v[0] for k, v in batch(rows=1, seed=i).items()} for i in range(6)]
    runs = []
    for refuse in (False, True):
        engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=1, micro=1), training_data=rows)
        losses = [engine.train_batch()]
        if refuse:
            for g in engine.optimizer.param_groups:
                g["weight_decay"] = 0.1
            with pytest.raises(ValueError, match="ds_zo decays exactly the matrices"):
                engine.train_batch()
            for g in engine.optimizer.param_groups:
                g["weight_decay"] = 0.0
        losses += [engine.train_batch() for _ in range(2)]
        runs.append(losses)
    assert runs[0] == runs[1]


def test_the_jobs_evaluation_runs_under_the_configs_autocast():
    """ds_zo.evaluation.evaluate (the job's dev and test accuracy) calls the model directly: it now runs under
    ds_config's torch_autocast as the training forwards and eval_batch do, not in the model's dtype."""
    from ds_zo.evaluation import evaluate
    cfg = ds_config(seed=3)
    cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    dtypes = []
    engine.module.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    examples = [{"input_ids": [5, 17, 33, 2], "labels": [-100, -100, -100, 2]}]
    assert evaluate(engine, examples, batch_size=1, pad_id=0, candidate_ids=[2, 3])["examples"] == 1
    assert dtypes == [torch.bfloat16]
