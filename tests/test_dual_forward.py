"""The doubled-batch dual forward equals two separate forwards, for every architecture."""
import copy

import pytest
import torch
from torch.func import functional_call

from ds_zo.model.dual_forward import dual_forward, merge_blocks, split_block
from ds_zo.model.perturbed_copies import PerturbedCopies
from ds_zo.model.units import UnitCutError, cut_into_units, resolve_trainable
from ds_zo.perturb import PerturbationGenerator, param_key
from models import ARCHS, batch, tiny_model


def test_split_rule():
    rows = 3
    h = torch.arange(6 * 4).view(6, 4)
    cache_position = torch.arange(6)          # 1-D of length 2B: not a batch tensor
    pos = torch.arange(4).view(1, 4)          # batch 1: both halves
    args = (h, cache_position, pos, None, (h, pos), {"m": h})
    first = split_block(args, 0, rows, 2)
    second = split_block(args, 1, rows, 2)
    assert torch.equal(first[0], h[:3]) and torch.equal(second[0], h[3:])
    assert first[1] is cache_position and first[2] is pos and first[3] is None
    assert torch.equal(second[4][0], h[3:]) and second[4][1] is pos
    assert torch.equal(second[5]["m"], h[3:])


def test_merge_expands_batch_one_halves():
    a, b = torch.ones(1, 4), torch.zeros(1, 4)
    merged = merge_blocks([a, b], rows=2)
    assert merged.shape == (4, 4) and merged[:2].eq(1).all() and merged[2:].eq(0).all()
    merged = merge_blocks([(torch.ones(2, 3), None)], rows=2)
    assert merged[0].shape == (2, 3) and merged[1] is None


@pytest.mark.parametrize("arch", ARCHS)
def test_units_cover_every_parameter_once(arch):
    for tied in (True, False):
        model = tiny_model(arch, tied)
        units = cut_into_units(model, resolve_trainable(model, []))
        ids = [id(r.param) for u in units for r in u.params]
        assert set(ids) == {id(p) for p in model.parameters()}
        # only a tied weight may appear in two units, and then it is one Parameter object
        dup = {i for i in ids if ids.count(i) > 1}
        assert len(dup) == (1 if tied else 0)
        # the decoder layers are units
        assert sum(1 for u in units if ".h." in u.name + "." or ".layers." in u.name + ".") == 2


def test_nested_units_are_rejected():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ModuleList([Odd(), Odd()])
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])  # the largest list
    with pytest.raises(UnitCutError, match="cannot cut .* 'inner.0' owns parameters directly and also contains unit "
                                           "'inner.0.layers.0', and a parameter of it trains"):
        cut_into_units(Outer(), {n for n, _ in Outer().named_parameters()})
    # its own parameter frozen, units that train inside it (LLaVA-NeXT's image_newline): no advice to freeze it
    model = Outer()
    with pytest.raises(UnitCutError, match="its own parameters are frozen, but trained units sit inside it"):
        cut_into_units(model, {n for n, _ in model.named_parameters() if not n.endswith("scale")})
    # frozen (a multimodal model's vision tower when only its language model trains): one unit of its subtree each
    model = Outer()
    units = cut_into_units(model, {n for n, _ in model.named_parameters() if n.startswith("blocks.")})
    assert [u.name for u in units] == ["inner.0", "inner.1", "blocks.0", "blocks.1", "blocks.2"]
    assert [len(u.params) for u in units[:2]] == [5, 5] and not any(r.trainable for u in units[:2] for r in u.params)


def test_a_layer_module_registered_outside_the_layers_too_is_refused():
    """One norm object as every layer's input norm and as the final norm: its call from the top-level forward had no
    wrapper and ran unperturbed in both slots (g −3.108 against −3.122, silently). Looped layers (one layer object
    twice in the list) and a layer aliased outside the list stay allowed: a layer's own forward is wrapped."""
    model = tiny_model("llama", tied=False)
    for layer in model.model.layers:
        layer.input_layernorm = model.model.norm
    with pytest.raises(UnitCutError, match=r"module 'model\.norm' is also 'model\.layers\.\d\.input_layernorm'"):
        cut_into_units(model, {n for n, _ in model.named_parameters()})
    model = tiny_model("llama", tied=False)
    model.model.layers.append(model.model.layers[0])
    model.model.last_layer = model.model.layers[1]
    units = cut_into_units(model, {n for n, _ in model.named_parameters()})
    assert [u.name for u in units if u.is_layer] == ["model.layers.0", "model.layers.1"]


def _perturbed_params(model, seed, eps, sign):
    gen = PerturbationGenerator()
    return {n: p + sign * (eps * gen.z(seed, 0, param_key(n), p.numel()).view_as(p))
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_dual_forward_equals_two_forwards(arch, rows, tied):
    model = tiny_model(arch, tied).eval()
    b = batch(rows=rows, pad=True)
    trainable = resolve_trainable(model, [])
    units = cut_into_units(model, trainable)
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    eps, seed = 1e-2, 42
    copies = PerturbedCopies(PerturbationGenerator(), keys, eps)
    copies.set_slots(seed, [(0, 1), (0, -1)])
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = {"input_ids": torch.cat([b["input_ids"]] * 2), "attention_mask": torch.cat([b["attention_mask"]] * 2)}
    with torch.no_grad(), dual_forward(units, 2, rows, copies):
        dual = model(**inputs, use_cache=False).logits
    ref = copy.deepcopy(model)
    with torch.no_grad():
        plus = functional_call(ref, _perturbed_params(ref, seed, eps, +1), args=(),
                               kwargs=dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)).logits
        minus = functional_call(ref, _perturbed_params(ref, seed, eps, -1), args=(),
                                kwargs=dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)).logits
    assert torch.equal(dual[:rows], plus) and torch.equal(dual[rows:], minus)
    assert not torch.equal(plus, minus)
    # the wrappers are gone and the masters untouched
    assert all("forward" not in u.module.__dict__ for u in units)
    assert all(torch.equal(p, masters[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_any_slot_set_matches_the_dual_forward(arch):
    """Four slots (q = 2) in one forward; one sign over an unreplicated batch (perturbation parallelism); θ itself."""
    model = tiny_model(arch).eval()
    b = batch(rows=2)
    units = cut_into_units(model, resolve_trainable(model, []))
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    copies = PerturbedCopies(PerturbationGenerator(), keys, 1e-2)
    with torch.no_grad():
        copies.set_slots(5, [(0, 1), (0, -1), (1, 1), (1, -1)])
        with dual_forward(units, 4, 2, copies):
            four = model(input_ids=torch.cat([b["input_ids"]] * 4),
                         attention_mask=torch.cat([b["attention_mask"]] * 4), use_cache=False).logits
        copies.set_slots(5, [(0, -1)])
        with dual_forward(units, 1, 2, copies):
            minus = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        copies.set_slots(5, [(1, 1)])
        with dual_forward(units, 1, 2, copies):
            plus1 = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        copies.set_slots(None, [None])
        with dual_forward(units, 1, 2, copies):
            plain = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        unwrapped = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    assert torch.equal(four[2:4], minus) and torch.equal(four[4:6], plus1)
    assert torch.equal(plain, unwrapped) and not torch.equal(plain, minus)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_dual_forward_rounds_each_copy_once(arch):
    model = tiny_model(arch, dtype=torch.bfloat16).eval()
    b = batch(rows=2)
    units = cut_into_units(model, resolve_trainable(model, []))
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    eps, seed = 1e-2, 8
    copies = PerturbedCopies(PerturbationGenerator(), keys, eps)
    copies.set_slots(seed, [(0, 1), (0, -1)])
    seen = {}
    unit = next(u for u in units if u.is_layer)   # formed whole (embeddings and heads form row blocks)
    original_acquire = copies.acquire

    def spy(u):
        out = original_acquire(u)
        if u is unit:
            seen["plus"] = [t.clone() for t in out[0]]
        return out
    copies.acquire = spy
    with torch.no_grad(), dual_forward(units, 2, 2, copies):
        logits = model(input_ids=torch.cat([b["input_ids"]] * 2), attention_mask=torch.cat([b["attention_mask"]] * 2),
                       use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    gen = PerturbationGenerator()
    for ref, got in zip(unit.trainable, seen["plus"]):
        z = gen.z(seed, 0, keys[id(ref.param)], ref.param.numel()).view_as(ref.param)
        assert torch.equal(got, (ref.param.float() + eps * z).bfloat16())


def test_a_unit_failing_on_a_later_slot_leaves_its_parameters_at_the_masters():
    """The wrapper points the parameters from one slot's copies straight to the next and back to the masters once:
    a slot that raises still leaves them at the masters (the same storage, the same values)."""
    from ds_zo.model.dual_forward import DualForwardError
    model = tiny_model("llama").eval()
    units = cut_into_units(model, resolve_trainable(model, []))
    layer = next(u for u in units if u.is_layer)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    calls = []
    original = layer.module.forward

    def fails_on_the_second_slot(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("slot 1 broke")
        return original(*args, **kwargs)
    layer.module.forward = fails_on_the_second_slot
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    copies = PerturbedCopies(PerturbationGenerator(), keys, 1e-2)
    copies.set_slots(1, [(0, 1), (0, -1)])
    b = batch(rows=1)
    with torch.no_grad(), pytest.raises(DualForwardError, match="row block 1 of 2"):
        with dual_forward(units, 2, 1, copies):
            model(input_ids=torch.cat([b["input_ids"]] * 2), use_cache=False)
    del layer.module.forward
    assert len(calls) == 2
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


@pytest.mark.parametrize("fail", [False, True])
def test_offloaded_units_go_from_their_last_copies_straight_to_their_store(fail):
    """Where the residency points a unit's parameters at its store on exit (the offload pipeline), the wrapper does
    not point them back at the masters first (host time on every visit of a host-bound GPU step): at exit they
    still point at the last slot's copies, and after it at the store, also when a slot raised."""
    from ds_zo.model.dual_forward import DualForwardError
    from ds_zo.offload.pipeline import OffloadPipeline
    from ds_zo.offload.store import ParameterStore
    model = tiny_model("llama").eval()
    units = cut_into_units(model, resolve_trainable(model, []))
    layers = [u for u in units if u.is_layer]
    store = ParameterStore(layers, None, pin=False)
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Spy(OffloadPipeline):
        def exit(self, unit, dirty):
            if self.repoints(unit):
                slot1 = copies.buffers.get("slot1", 1, torch.float32, torch.device("cpu"))   # (not re-allocated)
                at, size = slot1.data_ptr(), slot1.untyped_storage().nbytes()
                seen.append([at <= p.data_ptr() < at + size for p in (r.param for r in unit.trainable)])
            super().exit(unit, dirty)

    seen = []
    pipe = Spy(store, layers, torch.device("cpu"))
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    copies = PerturbedCopies(PerturbationGenerator(), keys, 1e-2, residency=pipe)
    copies.set_slots(1, [(0, 1), (0, -1)])
    assert copies.repoints(layers[0]) and not copies.repoints(next(u for u in units if not u.is_layer))
    if fail:
        original = layers[0].module.forward
        calls = []

        def fails_on_the_second_slot(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("slot 1 broke")
            return original(*args, **kwargs)
        layers[0].module.forward = fails_on_the_second_slot
    b = batch(rows=1)
    pipe.begin()
    with torch.no_grad(), dual_forward(units, 2, 1, copies):
        if fail:
            with pytest.raises(DualForwardError, match="row block 1 of 2"):
                model(input_ids=torch.cat([b["input_ids"]] * 2), use_cache=False)
            del layers[0].module.forward
        else:
            model(input_ids=torch.cat([b["input_ids"]] * 2), use_cache=False)
    assert len(seen) == (1 if fail else len(layers))
    for in_slot1 in seen:                  # at exit: still the second slot's copies (in its flat buffer)
        assert in_slot1 and all(in_slot1)
    for unit in layers:                    # after it: views of the store, holding the unperturbed values
        s = store[unit]
        lo, hi = s.flat.data_ptr(), s.flat.data_ptr() + s.nbytes
        for p in s.params:
            assert lo <= p.data_ptr() < hi
    for n, p in model.named_parameters():
        assert torch.equal(p, stored[n]), n
