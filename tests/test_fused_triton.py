"""The fused ZO passes (ds_zo/triton_passes.py): θ ± εz and the update with z in registers, one launch for many
segments. They must give the unfused path's values bit for bit — triton_z.fill into scratch, then torch's ops — on
every dtype, sign, offset and number of perturbations. On CPU they run in Triton's interpreter (tests/conftest.py),
on a GPU compiled."""
import pytest
import torch

import ds_zo
from ds_zo import triton_passes
from ds_zo.triton_passes import _bits
from ds_zo.model.perturbed_copies import _shifted
from ds_zo.optimizer import StepRecord, apply_step_pieces
from ds_zo.perturb import PerturbationGenerator, counter_based_unavailable, slice_key
from conftest import ds_config
from models import batch, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available() or counter_based_unavailable("cuda") is not None,
                          reason="needs CUDA and Triton")
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(counter_based_unavailable("cpu") is not None,
                                                        reason="needs Triton's interpreter")),
           pytest.param("cuda", marks=cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES, STARTS = [5000, 1, 16, 3, 700, 8193], [3, 0, 17, 1, 4096, 2]


def _unfused() -> PerturbationGenerator:
    gen = PerturbationGenerator(sampler="philox")
    gen.fused_passes = False
    return gen


def _interrupt_the_second_launch(monkeypatch):
    """triton_passes' second launch from now on raises KeyboardInterrupt (a Ctrl-C between launches); returns the
    real launch."""
    real, calls = triton_passes._launch, []

    def launch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_passes, "_launch", launch)
    return real


def _params(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(sum(SIZES), generator=g) * 0.05).to(device=device, dtype=dtype)
    return flat, list(flat.split(SIZES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signs", [(1, -1), (-1, 1), (1,), (-1,)])
def test_the_fused_perturbation_is_the_unfused_one_bitwise(device, dtype, signs):
    flat, masters = _params(device, dtype)
    outs = [torch.full_like(flat, float("nan")) for _ in signs]
    seed, eps = 991, 1e-3
    drawn = triton_passes.perturb([(m, s, slice_key(seed, 2, 50 + i), [o.split(SIZES)[i] for o in outs])
                                   for i, (m, s) in enumerate(zip(masters, STARTS))], signs, eps)
    assert drawn == sum(SIZES)
    gen = _unfused()
    for i, (m, s) in enumerate(zip(masters, STARTS)):
        ez = gen.z(seed, 2, 50 + i, s + m.numel(), start=s, device=device).mul_(eps)
        for o, sign in zip(outs, signs):
            ref = torch.empty_like(m)
            _shifted(m, ez, sign, ref)
            assert torch.equal(_bits(o.split(SIZES)[i]), _bits(ref)), (i, sign)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grads,wd", [((0.7,), 0.0), ((-0.7,), 0.1), ((0.0,), 0.1), ((-0.0,), 0.0),
                                      ((0.3, -0.2), 0.1), ((-1.5, -0.5, 2.0), 0.05), ((0.1,) * 5, 0.0)])
def test_the_fused_update_is_the_unfused_one_bitwise(device, dtype, grads, wd):
    """Every sign of g_0 (the step is added or subtracted; −0.0 counts as negative, as math.copysign says), mixed
    signs among several perturbations, q not a power of two (the division as torch divides on that device), weight
    decay on some segments only."""
    flat, _ = _params(device, dtype, seed=1)
    mine, ref = flat.clone(), flat.clone()
    seed, lr = 4242, 0.05
    decays = [i % 2 == 0 for i in range(len(SIZES))]
    drawn = triton_passes.update([(v, s, [slice_key(seed, j, 70 + i) for j in range(len(grads))], d)
                                  for i, (v, s, d) in enumerate(zip(mine.split(SIZES), STARTS, decays))],
                                 grads, lr, wd)
    assert drawn == sum(SIZES) * len(grads)
    record = StepRecord(step=0, seed=seed, g=tuple(grads), lr=lr, wd=wd)
    apply_step_pieces([(v, 70 + i, s, s + v.numel(), d)
                       for i, (v, s, d) in enumerate(zip(ref.split(SIZES), STARTS, decays))], record, _unfused())
    assert torch.equal(_bits(mine), _bits(ref))
    assert not torch.equal(mine, flat) or all(g == 0 for g in grads) and wd == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signs,d,quads", [((1, -1), 37, None), ((-1,), 37, None), ((1, -1), 32, 4),
                                           ((-1,), 37, 4)])
def test_the_rows_kernel_is_the_unfused_perturbation_bitwise(device, dtype, signs, d, quads, monkeypatch):
    """triton_passes.perturb_rows: an embedding's used rows, listed on the device (neighbours, the first and the last
    row; rows of a length that is no multiple of 4 start at every alignment), and one range at odd z offsets (an
    output layer's block), against master ± ε·z of the unfused path; the z values drawn are returned. With 4 Philox
    calls per program a row takes several programs (exactly its quads when its length is a multiple of 4)."""
    if quads is not None:
        monkeypatch.setattr(triton_passes, "QUADS", quads)
    rows_n = 300
    weight = (torch.randn(rows_n * d, generator=torch.Generator().manual_seed(3)) * 0.05).to(device=device,
                                                                                            dtype=dtype)
    seed, eps, key = 77, 1e-3, 9
    ez = _unfused().z(seed, 1, key, weight.numel(), device=device).mul_(eps)
    rows = torch.tensor([0, 1, 2, 5, 6, 150, 298, 299], device=device)
    grids, real = [], triton_passes._launch
    monkeypatch.setattr(triton_passes, "_launch", lambda kernel, grid, *rest: grids.append(grid) or
                        real(kernel, grid, *rest))
    for listed, (a, b) in ((True, (0, rows_n * d)), (False, (3, 5000)), (False, (4096, rows_n * d))):
        n = rows.numel() * d if listed else b - a
        outs = [torch.full((n,), float("nan"), dtype=dtype, device=device) for _ in signs]
        drawn = triton_passes.perturb_rows(weight if listed else weight[a:b], outs, signs,
                                           slice_key(seed, 1, key), eps, d if listed else b - a,
                                           rows=rows if listed else None, start=a)
        assert drawn == n
        if listed and quads is not None:       # programs per row: a row of 32 is 8 whole quads, one of 37 spans 10
            assert grids[-1] == rows.numel() * {32: 2, 37: 3}[d]
        pieces = [(r * d, (r + 1) * d, i * d) for i, r in enumerate(rows.tolist())] if listed else [(a, b, 0)]
        for o, sign in zip(outs, signs):
            for lo, hi, at in pieces:
                ref = torch.empty(hi - lo, dtype=dtype, device=device)
                _shifted(weight[lo:hi], ez[lo:hi], sign, ref)
                assert torch.equal(_bits(o[at:at + hi - lo]), _bits(ref)), (listed, lo, sign)


@pytest.mark.skipif(counter_based_unavailable("cpu") is not None, reason="needs Triton's interpreter")
@pytest.mark.parametrize("subset", [None, [1, 2, 5, 9, 63, 64, 90]])
def test_row_blocks_from_the_rows_kernel_are_the_unfused_ones(subset):
    """PerturbedCopies.working_rows on the fused rows kernel against the unfused path, bit for bit, for whole weights
    and row subsets (z over the trained rows only, the other rows the master's), with an unperturbed slot beside
    the two signs (a row subset's block then has no output for it)."""
    from ds_zo.model.perturbed_copies import PerturbedCopies
    from ds_zo.model.units import ParamRef
    weight = torch.nn.Parameter(torch.randn(100, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16))
    ref = ParamRef("w", weight, True, None if subset is None else torch.tensor(subset))
    blocks = {}
    for fused in (True, False):
        gen = PerturbationGenerator(sampler="philox")
        gen.fused_passes = fused
        copies = PerturbedCopies(gen, {id(weight): 31}, 1e-3)
        copies.set_slots(5, [None, (0, 1), (0, -1)])
        calls, real = [], triton_passes._launch
        triton_passes._launch = lambda kernel, *a, _real=real: calls.append(kernel) or _real(kernel, *a)
        try:
            blocks[fused] = [[b.clone() for b in copies.working_rows(ref, r0, r1)] for r0, r1 in ((0, 64), (64, 100))]
        finally:
            triton_passes._launch = real
        assert (triton_passes._perturb_rows_kernel in calls) == fused
    for mine, theirs in zip(blocks[True], blocks[False]):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(mine, theirs))
        assert torch.equal(mine[0], weight.data[:mine[0].shape[0]]) or torch.equal(mine[0], weight.data[64:])


def test_the_rows_kernel_refuses_what_it_cannot_read_or_write():
    weight, rows = torch.zeros(40), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="rows: an int64 contiguous tensor on cpu is needed, not a torch.int32"):
        triton_passes.perturb_rows(weight, [torch.empty(8)], (1,), 5, 1e-3, 4, rows=rows.to(torch.int32))
    with pytest.raises(ValueError, match="not a non-contiguous torch.int64"):
        triton_passes.perturb_rows(weight, [torch.empty(8)], (1,), 5, 1e-3, 4, rows=torch.tensor([0, 9, 2])[::2])
    with pytest.raises(ValueError, match="3 targets"):
        triton_passes.perturb_rows(weight, [torch.empty(8)] * 3, (1, -1, 1), 5, 1e-3, 4, rows=rows)
    with pytest.raises(ValueError, match="1 outputs for 2 signs"):
        triton_passes.perturb_rows(weight, [torch.empty(8)], (1, -1), 5, 1e-3, 4, rows=rows)
    out = torch.zeros(12)          # 2 rows of 4 need 8 elements: a short output would be written past its end
    with pytest.raises(ValueError, match=r"outs must be flat .* at least 8 elements, not \(4,\)"):
        triton_passes.perturb_rows(weight, [out[:4]], (1,), 5, 1e-3, 4, rows=rows)
    with pytest.raises(ValueError, match=r"master must be .* at least 10 elements, not \(8,\)"):
        triton_passes.perturb_rows(weight[:8], [out], (1,), 5, 1e-3, 10, start=3)
    with pytest.raises(ValueError, match="torch.float32 on cpu"):
        triton_passes.perturb_rows(weight, [torch.empty(8, dtype=torch.float64)], (1,), 5, 1e-3, 4, rows=rows)
    assert not out.any()
    assert triton_passes.perturb_rows(weight, [torch.empty(0)], (1,), 5, 1e-3, 4, rows=torch.tensor([],
                                                                                                   dtype=torch.int64)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_more_segments_than_a_launch_holds_take_several_launches(device, monkeypatch):
    launches = []
    real = triton_passes._launch
    monkeypatch.setattr(triton_passes, "_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    flat, masters = _params(device, torch.float32)
    results = {}
    for limit in (2, 256):
        monkeypatch.setattr(triton_passes, "MAX_SEGS", limit)
        launches.clear()
        out, theta = torch.full_like(flat, float("nan")), flat.clone()
        triton_passes.perturb([(m, s, slice_key(5, 0, i), [o]) for i, (m, s, o) in
                               enumerate(zip(masters, STARTS, out.split(SIZES)))], (1,), 0.5)
        spans = []
        triton_passes.update([(v, s, [slice_key(5, 0, i)], True) for i, (v, s) in
                              enumerate(zip(theta.split(SIZES), STARTS))], [0.3], 0.1, 0.01,
                             launched=lambda i, j: spans.append((i, j)))
        results[limit] = (out, theta, len(launches), spans)
    (out2, theta2, n2, spans2), (out_all, theta_all, n_all, spans_all) = results[2], results[256]
    assert (n2, spans2) == (6, [(0, 2), (2, 4), (4, 6)]) and (n_all, spans_all) == (2, [(0, 6)])
    assert torch.equal(out2, out_all) and not out2.isnan().any() and torch.equal(theta2, theta_all)


def test_an_update_cut_short_between_launches_reports_what_it_applied(monkeypatch):
    """Two dtypes are two launches; an interrupt at the second leaves the first's pieces updated and reported to
    `applied` (ZOSGD then skips them when the update resumes: applying them twice would be wrong), the second's
    untouched and not reported."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    gen = PerturbationGenerator(sampler="philox")
    a, b = torch.zeros(64), torch.zeros(64, dtype=torch.bfloat16)
    assert gen.fuses("cpu", torch.float32) and gen.fuses("cpu", torch.bfloat16)     # (their self-checks first)
    _interrupt_the_second_launch(monkeypatch)
    noted = []
    with pytest.raises(KeyboardInterrupt):
        gen.update_fused([(a, 1, 0, 64, False), (b, 2, 0, 64, False)], 7, [0.5], 0.1, 0.0, noted.extend)
    assert [p[1] for p in noted] == [1] and a.abs().sum() > 0 and b.abs().sum() == 0


def test_a_g_beyond_float32_gives_what_the_unfused_update_gives():
    """|g| above float32's range is ±inf in both paths (Triton's launcher and torch convert a float argument so),
    not an error in one of them."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    theta = torch.randn(100)
    mine, ref = theta.clone(), theta.clone()
    triton_passes.update([(mine, 0, [slice_key(3, 0, 9)], False)], [-1e39], 0.1, 0.0)
    apply_step_pieces([(ref, 9, 0, 100, False)], StepRecord(step=0, seed=3, g=(-1e39,), lr=0.1, wd=0.0), _unfused())
    assert mine.isinf().all()
    torch.testing.assert_close(mine, ref, rtol=0, atol=0, equal_nan=True)


def test_the_self_check_passes_here_and_catches_a_wrong_kernel(monkeypatch):
    """The generator trusts the kernels on a device only after this check: it must pass where they are right and
    name the pass that differs where they are not (here a |g| off by one unit in the last place)."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    for dtype in DTYPES:
        assert triton_passes.self_check("cpu", dtype) is None
    monkeypatch.setattr(triton_passes, "_f32_bits", lambda x, bits=triton_passes._f32_bits: bits(x) + 1)
    why = triton_passes.self_check.__wrapped__("cpu", torch.float32)
    assert why is not None and "the fused update differs from the unfused one" in why


def test_the_generator_fuses_what_it_can_and_hands_back_the_rest():
    """Jobs the kernel cannot take (a strided out, three targets, a dtype it does not know) come back for the
    unfused path, untouched; the others are written; a slice outside its parameter is an error, as for `fill`."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    gen = PerturbationGenerator(sampler="philox")
    master = torch.randn(64)
    ok, strided = torch.empty(64), torch.full((128,), 7.0)
    jobs = [(master, 1, 0, 9, 64, 0, [(ok, 1)]),
            (master, 1, 0, 9, 64, 0, [(strided[::2], 1)]),
            (master, 1, 0, 9, 64, 0, [(torch.empty(64), 1)] * 3),
            (master.double(), 1, 0, 9, 64, 0, [(torch.empty(64, dtype=torch.float64), 1)])]
    rest = gen.perturb_fused(jobs, 0.25)
    assert [id(j) for j in rest] == [id(j) for j in jobs[1:]] and (strided == 7.0).all()
    assert torch.equal(ok, master + gen.z(1, 0, 9, 64).mul_(0.25))
    with pytest.raises(ValueError, match="outside a parameter of 64 elements"):
        gen.perturb_fused([(master, 1, 0, 9, 64, 1, [(ok, 1)])], 0.25)
    pieces = [(torch.zeros(64), 9, 0, 64, False)]
    assert gen.update_fused(pieces, 1, [0.1] * (triton_passes.MAX_Q + 1), 0.1, 0.0) is pieces   # too many g: unfused
    assert gen.fuses("cpu", torch.float32) and not _unfused().fuses("cpu", torch.float32)
    assert "switched off" in _unfused().fused_kernels_unavailable("cpu", torch.float32)
    assert "not counter-based" in PerturbationGenerator(sampler="chunked").fused_kernels_unavailable("cpu",
                                                                                                     torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True])
def test_an_engine_with_fused_kernels_takes_the_unfused_engines_steps(device, offload, monkeypatch):
    """Three steps of a tied tiny Llama with the fused kernels and without (the generator's `fused_passes`), resident
    and offloaded: the same losses, the same g and the same parameters, bit for bit; the kernels ran only where
    switched on."""
    import copy
    base = tiny_model("llama", True)
    launches = {"perturb": 0, "update": 0, "rows": 0}
    names = {triton_passes._perturb_kernel: "perturb", triton_passes._update_kernel: "update",
             triton_passes._perturb_rows_kernel: "rows"}

    def counted(kernel, *args, _run=triton_passes._launch):
        launches[names[kernel]] += 1
        return _run(kernel, *args)
    monkeypatch.setattr(triton_passes, "_launch", counted)
    results = []
    for fused in (True, False):          # (zero_order.fused_passes)
        cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, z_sampler="philox", fused_passes=fused)
        if offload:
            cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base).to(device), config=cfg)
        assert engine.perturbations.fused_passes == fused
        drawn0 = engine.perturbations.elements_drawn
        losses = [engine.train_batch({k: v.to(device) for k, v in batch(seed=t).items()}) for t in range(3)]
        results.append((losses, [r.g for r in engine.step_log], engine.module_state_dict(),
                        engine.perturbations.elements_drawn - drawn0))
        counts = dict(launches)
        launches.update(perturb=0, update=0, rows=0)
        if fused:        # (rows: the embedding's ids and the output layer's row blocks)
            assert counts["perturb"] > 0 and counts["update"] > 0 and counts["rows"] > 0, counts
        else:
            assert counts == {"perturb": 0, "update": 0, "rows": 0}
    (l1, g1, sd1, n1), (l2, g2, sd2, n2) = results
    assert l1 == l2 and g1 == g2
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # z drawn: the same but for the tied embedding's ids' rows. On CPU the unfused path keeps their ε·z for the
    # output layer, which the fused one draws again; on a GPU the unfused path forms every block that holds an id,
    # the fused one only the ids' rows
    ids_rows = sum(batch(seed=t)["input_ids"].unique().numel() for t in range(3)) * base.config.hidden_size
    if device == "cpu":
        assert n1 - n2 == ids_rows
    else:
        assert n1 < n2


def _zosgd(params, fused: bool):
    from ds_zo.optimizer import ZOSGD
    decayed = [p for p in params if p.dim() >= 2]          # (ds_zo decays exactly the matrices)
    groups = [{"params": decayed, "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = ZOSGD([g for g in groups if g["params"]], lr=0.05, eps=1e-3)
    gen = PerturbationGenerator(sampler="philox")
    gen.fused_passes = fused
    opt.attach(gen, {id(p): 40 + i for i, p in enumerate(params)})
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kept_update_layout_gives_the_unfused_update_and_follows_the_groups(device, dtype):
    """ZOSGD's update from a layout kept per parameter list and address (one launch, the step's keys filled in)
    against the unfused update, over steps of either sign, q = 1 and 2, an empty parameter, and a weight decay the
    groups turn off mid-run (the layouts' rows hold which parameters decay: a layout is kept per decay on or off)."""
    made = []
    for fused in (True, False):
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.05).to(device=device, dtype=dtype))
                  for n in ((20, 15), 7, 0, 4099)]
        made.append((params, _zosgd(params, fused)))
    (mine, fused_opt), (ref, plain_opt) = made
    built = []
    fused_opt._fused_layout = lambda *a, _real=fused_opt._fused_layout: built.append(1) or _real(*a)
    steps = [(0.7,), (-0.4,), (0.3, -1.2), (0.5,)]
    for t, grads in enumerate(steps):
        if t == 3:
            for opt in (fused_opt, plain_opt):
                opt.param_groups[0]["weight_decay"] = 0.0
        for opt, params in ((fused_opt, mine), (plain_opt, ref)):
            opt.record_step(t, 1000 + t, list(grads), 0.05, opt.weight_decay())
            assert opt.apply_pending(params) is True
            opt.flush()
        assert all(torch.equal(_bits(a.data), _bits(b.data)) for a, b in zip(mine, ref)), t
    # laid out at the first step, for q = 2, and for q = 1 again once the decay was off (not at the second step)
    assert len(built) == 3 and all(v is not False for v in fused_opt._fused_layouts.values())


def test_an_update_from_a_kept_layout_cut_short_resumes_without_applying_twice(monkeypatch):
    """A unit's update split over launches (segment limit lowered) and interrupted at the second: the parameters of
    the first launch are noted as updated as soon as it is issued, so the update, resumed, applies the rest once."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setattr(triton_passes, "MAX_SEGS", 2)
    made = []
    for _ in range(2):
        g = torch.Generator().manual_seed(9)
        params = [torch.nn.Parameter(torch.randn(n, generator=g) * 0.05) for n in (40, 3, 17, 64, 9)]
        before = [p.detach().clone() for p in params]
        opt = _zosgd(params, True)
        opt.record_step(0, 77, [0.6], 0.05, opt.weight_decay())
        made.append((params, opt))
    (cut, cut_opt), (whole, whole_opt) = made
    real = _interrupt_the_second_launch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cut_opt.apply_pending(cut)
    assert cut_opt._pending_done == {id(cut[0]), id(cut[1])}
    monkeypatch.setattr(triton_passes, "_launch", real)
    cut_opt.flush()
    whole_opt.flush()
    assert all(torch.equal(a, b) and not torch.equal(a, b0) for a, b, b0 in zip(cut, whole, before))


@pytest.mark.parametrize("offload", [False, True])
def test_a_fused_unit_is_one_launch_per_pass_from_a_kept_layout(offload, monkeypatch):
    """On the fused path a unit's copies are one launch per perturbation and its update one launch, and the
    layouts are kept: once every unit has been seen at its addresses (the offload pipeline alternates buffers),
    a step lays out nothing and pays only its keys."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    from ds_zo.model.perturbed_copies import PerturbedCopies
    from ds_zo.optimizer import ZOSGD
    counts = {"perturb": 0, "update": 0, "rows": 0, "copies": 0, "updates": 0, "layouts": 0}
    names = {triton_passes._perturb_kernel: "perturb", triton_passes._update_kernel: "update",
             triton_passes._perturb_rows_kernel: "rows"}

    def counted(kernel, *args, _run=triton_passes._launch):
        counts[names[kernel]] += 1
        return _run(kernel, *args)
    monkeypatch.setattr(triton_passes, "_launch", counted)
    for cls, name, what in ((PerturbedCopies, "_copies_fused", "copies"), (ZOSGD, "_apply_fused", "updates")):
        def spy(*args, _real=getattr(cls, name), _what=what):
            out = _real(*args)
            counts[_what] += out is not None
            return out
        monkeypatch.setattr(cls, name, spy)
    for cls in (PerturbedCopies, ZOSGD):
        def built(*args, _real=cls._fused_layout):
            counts["layouts"] += 1
            return _real(*args)
        monkeypatch.setattr(cls, "_fused_layout", built)
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, z_sampler="philox", num_perturbations=2)
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama", True), config=cfg)
    per_step = []
    for t in range(4):
        counts.update(dict.fromkeys(counts, 0))
        engine.train_batch(batch(seed=t))
        per_step.append(dict(counts))
    for t, c in enumerate(per_step):
        # whole copies: the 2 decoder layers and the final norm, q = 2 launches each; updated from the second step
        # on: those and the tied embedding / output weight (its copies are row blocks), one launch each
        assert (c["copies"], c["perturb"]) == (3, 6) and c["update"] == c["updates"] == (4 if t else 0), per_step
        # the tied weight's rows: the embedding's ids and the output layer's one block, one launch per perturbation
        assert c["rows"] == 2 * 2, per_step
    assert per_step[0]["layouts"] == 3 and per_step[-1]["layouts"] == 0, per_step


def test_a_kept_layout_is_not_taken_by_a_view_with_other_strides():
    """A parameter whose .data becomes a transposed view at the same address, length and dtype: the copies and the
    update take the general path again (a kept layout, made of contiguous tensors, would read it in storage
    order), so the copies are the ones a fresh provider forms, and the update refuses it as the general path does."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    from ds_zo.model.perturbed_copies import PerturbedCopies
    from ds_zo.model.units import ParamRef, Unit
    from ds_zo.optimizer import ZOSGD

    def made(transposed):
        g = torch.Generator().manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(4, 4, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))
        if transposed:
            w.data = w.data.t()
        unit = Unit("u", torch.nn.Module(), [ParamRef("b", b, True), ParamRef("w", w, True)])
        provider = PerturbedCopies(PerturbationGenerator(sampler="philox"), {id(w): 11, id(b): 12}, 1e-3)
        opt = ZOSGD([b, w], lr=0.05)
        opt.attach(PerturbationGenerator(sampler="philox"), {id(w): 11, id(b): 12})
        return w, b, unit, provider, opt

    def copies(provider, unit, seed):
        provider.set_slots(seed, [(0, 1), (0, -1)])
        return [[t.clone() for t in slot] for slot in provider._copies(unit)]

    w, b, unit, provider, opt = made(False)
    copies(provider, unit, 5)
    opt.record_step(0, 1, [0.5], 0.05, 0.0)
    assert opt.apply_pending([b, w]) and len(opt._fused_layouts) == 1
    opt.flush()
    w.data = w.data.t()
    fresh_w, _, fresh_unit, fresh_provider, fresh_opt = made(True)
    fresh_w.data.copy_(w.data)
    _.data.copy_(b.data)
    mine, ref = copies(provider, unit, 6), copies(fresh_provider, fresh_unit, 6)
    assert all(torch.equal(x, y) for s1, s2 in zip(mine, ref) for x, y in zip(s1, s2))
    assert (mine[0][1] - w.data).abs().max() < 0.01          # θ + εz of w as it reads now
    opt.record_step(1, 2, [0.5], 0.05, 0.0)
    with pytest.raises(RuntimeError, match="view size"):
        opt.apply_pending([b, w])


def test_a_general_path_update_leaves_the_fused_one_on_for_other_units():
    """A resliced shard (or any unit the fused path declines) is updated piece by piece; once its parameters are
    done their pieces are forgotten, so the units after it in the step still take their kept layouts."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    from ds_zo.optimizer import ZOSGD
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(n, generator=g)) for n in (64, 32, 16))
    opt = ZOSGD([a, b, c], lr=0.05)
    opt.attach(PerturbationGenerator(sampler="philox"), {id(a): 1, id(b): 2, id(c): 3})
    for step in range(2):
        opt.record_step(step, 10 + step, [0.5], 0.05, 0.0)
        opt.apply_pending_to_slices([(a, a.data.view(-1), 0, a.numel())])
        assert opt._pieces_done and id(a) in opt._pending_done
        assert opt._apply_fused([b, c]) is True
        once = a.detach().clone()
        opt.apply_pending_to_slices([(a, a.data.view(-1), 0, a.numel())])     # (its pieces are known done)
        assert torch.equal(a, once)
        opt.flush()


def test_an_optimizer_attached_again_forgets_its_layouts():
    """An optimizer handed to a new engine is attached again, maybe with row subsets (trainable_rows) where the
    old engine trained whole parameters: a kept whole-parameter layout must not update every row."""
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    from ds_zo.optimizer import ZOSGD
    w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    opt = ZOSGD([w], lr=0.05)
    opt.attach(PerturbationGenerator(sampler="philox"), {id(w): 5})
    for step, rows in enumerate((None, torch.tensor([1, 3]))):
        if rows is not None:
            opt.attach(PerturbationGenerator(sampler="philox"), {id(w): 5}, {id(w): rows})
        before = w.detach().clone()
        opt.record_step(step, 20 + step, [0.5], 0.05, 0.0)
        assert opt.apply_pending([w])
        opt.flush()
        changed = (w != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == (list(range(6)) if rows is None else [1, 3])
