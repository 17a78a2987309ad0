"""The fused native element-wise passes (ds_zo/native/z_passes.h): the working copies θ ± εz and the update, each in
one sweep with z drawn a tile at a time. They must give the Python path's values bit for bit (torch's normal_ and
torch's element-wise ops), for whole chunks and any part of one, and leave to that path whatever they cannot do."""
import itertools

import pytest
import torch

from ds_zo import native
from ds_zo.optimizer import StepRecord, apply_step_pieces
from ds_zo.perturb import PerturbationGenerator, chunk_key
from test_native import _has_avx2_fma, needs_native

# chunk sizes around the groups of 16, the redrawn tail and the 624-word twists
SIZES = [16, 17, 31, 623, 624, 625, 1263, 4111, 70_001]


@pytest.fixture
def kernels():
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the fused passes need the vectorised sampler (AVX2 and FMA)")
    return native.chunk_draws()


def _parts(n: int) -> list[tuple[int, int]]:
    """Whole chunk, head, tail, the last few values (the redrawn tail), an interior part, a part inside one group."""
    parts = [(0, n), (0, max(1, n // 3)), (n // 2, n), (n - 5, n), (3, n - 3), (17, 30)]
    return [(a, b) for a, b in parts if 0 <= a < b <= n]


def _groups_drawn(n: int, a: int, b: int) -> int:
    """Values a part [a, b) of a chunk of n draws: its groups of 16 up to the positions the redrawn tail replaces,
    and the tail's 16 where the part reaches it (a part that starts past those positions draws only the tail)."""
    limit = n if n % 16 == 0 else n - 16
    main = sum(min(g + 16, limit) - g for g in range(a // 16 * 16, min(b, limit), 16)) if a < limit else 0
    return main + (16 if n % 16 and b > n - 16 else 0)


def test_working_copies_are_master_plus_and_minus_torchs_draw(kernels):
    """perturb_pieces: each out is torch.add / torch.sub of the master and normal_(0, ε) of the chunk, over any part
    of a chunk; the values drawn are counted as torch counts a chunk (n for a whole one), for a part only its groups."""
    rng = torch.Generator().manual_seed(0)
    for n in SIZES:
        for a, b in _parts(n):
            key = int(torch.randint(0, 2**62, (1,), generator=rng))
            eps = 1e-3
            z = torch.empty(n).normal_(0.0, eps, generator=torch.Generator().manual_seed(key))
            master = torch.randn(b - a, generator=rng)
            plus, minus = torch.empty(b - a), torch.empty(b - a)
            drawn = kernels.perturb_pieces([master], [key], [n], [a], eps, [plus, minus], [0, 0], [True, False])
            assert torch.equal(plus, torch.add(master, z[a:b])), (n, a, b)
            assert torch.equal(minus, torch.sub(master, z[a:b])), (n, a, b)
            assert drawn == _groups_drawn(n, a, b), (n, a, b)
            if (a, b) == (0, n):
                assert drawn == n


def test_the_update_is_apply_step_pieces_bit_for_bit(kernels):
    """update_pieces gives optimizer.apply_step_pieces' values with the fused passes off: q = 1, 2, 3 perturbations,
    gradients of both signs, weight decay on and off, whole chunks and parts of chunks (ZeRO shards)."""
    rng = torch.Generator().manual_seed(1)
    plain = PerturbationGenerator(chunk_elements=1000)
    plain.fused_passes = False
    numel = 2517                                    # chunks of 1000, 1000 and 517 values
    for q, decays, wd, signs in itertools.product((1, 2, 3), (False, True), (0.0, 0.01),
                                                  ((1, 1, 1), (-1, 1, -1), (-1, -1, 1))):
        grads = tuple(s * float(torch.rand(1, generator=rng)) * 3 + s * 0.1 for s in signs[:q])
        record = StepRecord(1, int(torch.randint(0, 2**62, (1,), generator=rng)), grads, 1e-2, wd)
        for start, stop in ((0, 1000), (1000, 2000), (2000, 2517), (300, 1000), (2100, 2400), (1000, 1700)):
            theta = torch.randn(stop - start, generator=rng)
            want = theta.clone()
            apply_step_pieces([(want, 77, start, numel, decays)], record, plain)
            k = start // 1000
            keys = [chunk_key(record.seed, j, 77, k) for j in range(q)]
            done = torch.zeros(1, dtype=torch.uint8)
            kernels.update_pieces([theta], keys, [min(1000, numel - k * 1000)], [start - k * 1000], list(grads),
                                  record.lr, wd, [decays and wd != 0.0], done)
            assert done.item() == 1
            assert torch.equal(theta, want), (q, decays, wd, signs, start, stop)


def test_parts_that_start_in_the_redrawn_tail_are_updated_like_apply_step_pieces(kernels):
    """A ZeRO-3 shard may start in the last 16 values of a parameter whose size is not a multiple of 16, which come
    from the redrawn tail: the group tile before it ends before the shard starts and holds nothing of it (the
    update copied a negative range there and crashed the process: 224 of 2,361 slices, found in review)."""
    plain = PerturbationGenerator()
    plain.fused_passes = False
    record = StepRecord(1, 12345, (0.7,), 1e-2, 0.1)
    for n in (17, 20, 30, 33, 70):
        for a in range(n):
            for b in sorted({a + 1, min(n, a + 5), n}):
                theta = torch.randn(b - a)
                want = theta.clone()
                apply_step_pieces([(want, 99, a, n, True)], record, plain)
                kernels.update_pieces([theta], [chunk_key(record.seed, 0, 99, 0)], [n], [a], [0.7], record.lr, 0.1,
                                      [True], torch.zeros(1, dtype=torch.uint8))
                assert torch.equal(theta, want), (n, a, b)
                plus = torch.empty(b - a)
                drawn = kernels.perturb_pieces([want], [7], [n], [a], 1e-3, [plus], [0], [True])
                z = torch.empty(n).normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(7))
                assert torch.equal(plus, torch.add(want, z[a:b])) and drawn == _groups_drawn(n, a, b), (n, a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_generator_fuses_what_it_can_and_returns_the_rest(kernels, threads):
    """PerturbationGenerator.perturb_fused / update_fused: float32 CPU slices spanning several chunks (and starting
    inside one) are done natively, on the threads, with the Python path's values; a bfloat16 tensor, a parameter
    whose last chunk is shorter than 16 values and a zero gradient are handed back untouched."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen, plain = PerturbationGenerator(chunk_elements=1000), PerturbationGenerator(chunk_elements=1000)
        plain.fused_passes = False
        rng = torch.Generator().manual_seed(2)
        numel, start = 4500, 700
        master = torch.randn(numel - start, generator=rng)
        outs = [torch.empty_like(master), torch.empty_like(master)]
        short = torch.randn(1005, generator=rng)      # last chunk: 5 values
        half = torch.randn(2000, generator=rng).bfloat16()
        rest = gen.perturb_fused([(master, 9, 0, 5, numel, start, [(outs[0], 1), (outs[1], -1)]),
                                  (short, 9, 0, 6, 1005, 0, [(torch.empty(1005), 1)]),
                                  (half, 9, 0, 7, 2000, 0, [(torch.empty(2000).bfloat16(), 1)])], scale=1e-3)
        assert [job[3] for job in rest] == [6, 7]
        ez = torch.empty(numel - start)
        plain.fill(ez, 9, 0, 5, numel, start, scale=1e-3)
        assert torch.equal(outs[0], torch.add(master, ez)) and torch.equal(outs[1], torch.sub(master, ez))

        record = StepRecord(3, 1234, (0.7, -0.2), 1e-2, 0.1)
        theta, want = master.clone(), master.clone()
        drawn = gen.elements_drawn
        left = gen.update_fused([(theta, 5, start, numel, True), (short.clone(), 6, 0, 1005, True)], record.seed,
                                record.g, record.lr, record.wd)
        assert len(left) == 1 and left[0][1] == 6
        apply_step_pieces([(want, 5, start, numel, True)], record, plain)
        assert torch.equal(theta, want)
        assert gen.elements_drawn - drawn == 2 * (numel - 688)      # from the group holding element 700 on
        assert gen.update_fused([(theta, 5, start, numel, True)], 1, (0.0,), 1e-2, 0.0) != []
        noted = []
        gen.update_fused([(theta, 5, start, numel, True)], record.seed, record.g, record.lr, record.wd, noted.extend)
        assert [piece[1:3] for piece in noted] == [(5, start)]      # what the sweep updated, for the optimizer
        # a slice outside its parameter is refused, as fill refuses it (it used to be fused with another chunk's z)
        with pytest.raises(ValueError, match=r"slice \[-5, \+10\) .* parameter of 100 elements"):
            gen.update_fused([(torch.zeros(10), 5, -5, 100, True)], 1, (0.5,), 1e-2, 0.0)
        with pytest.raises(ValueError, match="not a flat slice"):
            gen.perturb_fused([(torch.zeros(95), 9, 0, 5, 100, 10, [(torch.empty(95), 1)])], scale=1e-3)
    finally:
        torch.set_num_threads(before)


def test_training_is_the_same_with_the_fused_passes_on_or_off(kernels):
    """Three ZO steps of a tiny HF model with two perturbations and weight decay (z chunks of 500 values, two threads)
    give the same parameters bit for bit with the fused passes or with drawn chunks and torch's element-wise ops;
    the fused run really used both passes."""
    import ds_zo
    from conftest import ds_config
    from models import assert_same_state, tiny_model, trained_state

    results, calls = [], []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for fused in (True, False):
            engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(wd=0.1, num_perturbations=2))
            engine.perturbations.chunk = 500
            engine.perturbations.fused_passes = fused
            for name in ("perturb_fused", "update_fused"):     # count what each pass took (on this instance only)
                def counting(items, *args, _orig=getattr(engine.perturbations, name), _name=name, _fused=fused):
                    rest = _orig(items, *args)
                    calls.append((_fused, _name, len(items) - len(rest)))
                    return rest
                setattr(engine.perturbations, name, counting)
            results.append(trained_state(engine))
    finally:
        torch.set_num_threads(before)
    for name in ("perturb_fused", "update_fused"):
        assert any(f and n > 0 for f, m, n in calls if m == name), name
    assert not any(not f and n > 0 for f, _, n in calls)
    assert_same_state(*results)
