import threading

import pytest
import torch

from ds_zo import native
from ds_zo.perturb import chunk_key, MAX_PARALLEL_CHUNKS, PerturbationGenerator, mix, param_key, step_seed
from test_native import needs_native


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("numel", [1, 15, 16, 17, 100, 1000])
def test_slices_equal_whole(distribution, numel):
    gen = PerturbationGenerator(distribution, chunk_elements=64)
    whole = gen.z(7, 0, 11, numel)
    assert whole.shape == (numel,)
    g = torch.Generator().manual_seed(numel)
    for _ in range(20):
        a = int(torch.randint(0, numel, (1,), generator=g))
        b = int(torch.randint(a, numel + 1, (1,), generator=g))
        assert torch.equal(gen.z(7, 0, 11, numel, a, b), whole[a:b])


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 64, 70, 100, 1000])   # 70: a last chunk of 6 values
def test_z_is_each_chunk_drawn_whole_from_its_key(numel):
    """The definition, written out independently of fill's bookkeeping: chunk k of a parameter is torch's normal_
    over the chunk's full length (the last one may be short) from a generator seeded with chunk_key(..., k), times
    the scale (folded into normal_ from 16 values up); any slice is the matching part of those chunks."""
    c, scale = 64, 0.25
    chunks = []
    for k in range(-(-numel // c)):
        n = min(c, numel - k * c)
        g = torch.Generator().manual_seed(chunk_key(7, 2, 11, k))
        chunks.append(torch.empty(n).normal_(0.0, scale, generator=g) if n >= 16
                      else torch.empty(n).normal_(generator=g).mul_(scale))
    want = torch.cat(chunks)
    gen = PerturbationGenerator(chunk_elements=c)
    out = torch.empty(numel)
    assert torch.equal(gen.fill(out, 7, 2, 11, numel, scale=scale), want)
    for a, b in [(0, numel), (numel // 3, numel), (numel // 2, numel // 2 + 1), (numel, numel), (0, numel // 2)]:
        part = torch.empty(b - a)
        assert torch.equal(gen.fill(part, 7, 2, 11, numel, start=a, scale=scale), want[a:b]), (a, b)


def test_shards_of_any_partitioning_concatenate_to_whole():
    gen = PerturbationGenerator(chunk_elements=32)
    numel = 1000
    whole = gen.z(3, 1, param_key("w"), numel)
    for world in (1, 2, 3, 4, 7):
        per = -(-numel // world)
        shards = [gen.z(3, 1, param_key("w"), numel, r * per, min(numel, (r + 1) * per)) for r in range(world)]
        assert torch.equal(torch.cat(shards), whole)


def test_fill_into_offset_buffer_and_chunk_boundaries():
    gen = PerturbationGenerator(chunk_elements=16)
    whole = gen.z(1, 0, 5, 80)
    out = torch.full((40,), float("nan"))
    gen.fill(out[5:37], 1, 0, 5, 80, start=16)  # exactly two whole chunks
    assert torch.equal(out[5:37], whole[16:48])
    assert torch.isnan(out[:5]).all() and torch.isnan(out[37:]).all()


def test_keys_separate_seed_index_and_parameter():
    gen = PerturbationGenerator()
    base = gen.z(1, 0, 5, 256)
    assert not torch.equal(base, gen.z(2, 0, 5, 256))
    assert not torch.equal(base, gen.z(1, 1, 5, 256))
    assert not torch.equal(base, gen.z(1, 0, 6, 256))
    assert torch.equal(base, PerturbationGenerator().z(1, 0, 5, 256))  # no hidden state


def test_independent_of_global_rng_and_call_order():
    gen = PerturbationGenerator()
    a = gen.z(9, 0, 1, 300)
    torch.manual_seed(123)
    torch.randn(10)
    gen.z(4, 0, 2, 77)
    assert torch.equal(gen.z(9, 0, 1, 300), a)


def test_distributions_have_the_right_moments():
    z = PerturbationGenerator("gaussian").z(0, 0, 0, 200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    r = PerturbationGenerator("rademacher").z(0, 0, 0, 200_000)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


def test_stable_keys():
    # pinned: keys must not change between releases or processes, or old step logs stop replaying
    assert param_key("model.embed_tokens.weight") == param_key("model.embed_tokens.weight")
    assert step_seed(0, 0) != step_seed(0, 1) != step_seed(1, 0)
    assert mix(1, 2) != mix(2, 1)
    assert 0 <= mix(2**64 - 1, 5) < 2**63
    for values in [(1, 2, 3, 4), (-1, 2**70 + 5, 0, 2**63), (12345, 0, 987654321987, 17)]:
        assert chunk_key(*values) == mix(*values)      # the per-chunk fast path defines the same keys


def test_bad_arguments():
    with pytest.raises(ValueError, match="distribution"):
        PerturbationGenerator("uniform")
    gen = PerturbationGenerator()
    with pytest.raises(ValueError, match="outside"):
        gen.z(0, 0, 0, 10, 5, 11)
    with pytest.raises(ValueError, match="float32"):
        gen.fill(torch.empty(4, dtype=torch.float64), 0, 0, 0, 4)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("sampler", ["native", "python threads"])
def test_parallel_chunk_draws_equal_serial(distribution, sampler, monkeypatch):
    """On CPU a fill of several whole chunks draws them at once (each chunk has its own key and generator): on the
    intra-op threads with the native sampler, else on Python worker threads. The values do not depend on the
    thread count or the sampler, and a span is whole chunks."""
    if sampler == "native":
        needs_native()
    else:
        monkeypatch.setattr(native, "chunk_draws", lambda: None)
    n = 10 * 1000 + 37
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = PerturbationGenerator(distribution, chunk_elements=1000)
        assert serial.parallel_chunks(torch.device("cpu")) == 1 and serial.span(torch.device("cpu")) == 1000
        one = serial.z(3, 1, 7, n)
        torch.set_num_threads(3)
        par = PerturbationGenerator(distribution, chunk_elements=1000)
        assert par.parallel_chunks(torch.device("cpu")) == 3 and par.span(torch.device("cpu")) == 3000
        assert torch.equal(par.z(3, 1, 7, n), one)
        assert torch.equal(par.z(3, 1, 7, n, start=1500, stop=9000), one[1500:9000])   # partial ends, whole middle
        assert par.elements_drawn == n + 8 * 1000
        scaled = torch.empty(n)
        par.fill(scaled, 3, 1, 7, n, scale=1e-3)
        assert torch.equal(scaled, one * 1e-3)
        if sampler == "native":
            assert par._pool is None                        # the intra-op threads drew
        else:
            workers = {t.name for t in threading.enumerate() if t.name.startswith("ds_zo-z")}
            assert par._pool_size == 3 and len(workers) >= 3
        torch.set_num_threads(64)
        assert par.parallel_chunks(torch.device("cpu")) == MAX_PARALLEL_CHUNKS
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("sampler", ["native", "python threads"])
def test_parallel_draws_under_inference_mode(sampler, monkeypatch):
    """Buffers made under torch.inference_mode are inference tensors, writable only in inference mode: the drawing
    threads take the caller's mode."""
    if sampler == "python threads":
        monkeypatch.setattr(native, "chunk_draws", lambda: None)
    else:
        needs_native()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = PerturbationGenerator(chunk_elements=1000).z(1, 0, 2, 8000)
        with torch.inference_mode():
            got = PerturbationGenerator(chunk_elements=1000).z(1, 0, 2, 8000)
        assert got.is_inference() and torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("numel", [1, 15, 16, 17, 1000, 4099])
def test_scaled_draws_equal_z_times_scale(distribution, numel):
    """fill(scale=s) is z.mul_(s) bit for bit, whether the sampler applies s itself (chunks of >= 16, s > 0 and
    finite) or the multiply runs after it (tiny chunks, s <= 0, inf, NaN)."""
    gen = PerturbationGenerator(distribution, chunk_elements=1024)
    z = gen.z(5, 0, 9, numel)
    for s in (1.0, 1e-3, 0.37, 123.5, 1e-30, 3e38, 0.0, -2.5, float("inf"), float("nan")):
        out = torch.empty(numel)
        gen.fill(out, 5, 0, 9, numel, scale=s)
        assert torch.equal(out.view(torch.int32), (z * s).view(torch.int32)), s


def test_generator_copies_make_their_own_pool(monkeypatch):
    import copy
    import pickle
    monkeypatch.setattr(native, "chunk_draws", lambda: None)    # the Python worker pool
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gen = PerturbationGenerator(chunk_elements=100)
        z = gen.z(1, 0, 2, 1000)       # starts the worker pool
        assert gen._pool is not None
        for twin in (copy.deepcopy(gen), pickle.loads(pickle.dumps(gen))):
            assert twin._pool is None and torch.equal(twin.z(1, 0, 2, 1000), z)
    finally:
        torch.set_num_threads(before)


def test_draw_groups_only_where_the_sampler_can_skip(monkeypatch):
    """PerturbationGenerator.draw_groups draws (and counts) only the marked groups where the vectorised sampler can
    skip the rest, and otherwise draws nothing and says so, for its caller to draw whole chunks."""
    needs_native()
    if not native.chunk_draws().fast_gaussian():
        pytest.skip("the vectorised sampler is off here")
    gen = PerturbationGenerator(chunk_elements=64)
    groups = torch.tensor([0, 1, 0, 1], dtype=torch.uint8)
    out = torch.empty(64)
    assert gen.draw_groups(out, 9, 0.5, groups) and gen.elements_drawn == 32
    whole = torch.empty(64).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out[16:32], whole[16:32]) and torch.equal(out[48:], whole[48:])
    assert not PerturbationGenerator("rademacher").draw_groups(torch.empty(64), 9, 0.5, groups)
    assert not gen.draw_groups(torch.empty(40), 9, 0.5, groups[:2].clone())            # not a multiple of 16
    assert not gen.draw_groups(out, 9, 0.0, groups)                                     # a scale that cannot fold
    monkeypatch.setattr(native, "chunk_draws", lambda: None)
    assert not gen.draw_groups(out, 9, 0.5, groups) and gen.elements_drawn == 32


def test_accelerator_span_is_capped_by_the_largest_decoder_layer_and_the_model():
    """A GPU's span: 8 chunks, but no more chunks than the model's largest decoder layer covers (its scratch and
    the row blocks it sizes would only add to the peak), nor than 1/64 of the model's elements (what the span adds
    to the output layer's peak stays a small share of the model); none known: 8."""
    from ds_zo.perturb import ACCELERATOR_SPAN_CHUNKS, SPAN_MODEL_SHARE, accelerator_span_chunks
    c = 1 << 20
    assert ACCELERATOR_SPAN_CHUNKS == 8 and SPAN_MODEL_SHARE == 64
    assert accelerator_span_chunks(3_539_712, c) == 4          # SmolLM2-135M's decoder layer: 3.4 chunks
    assert accelerator_span_chunks(3_539_712, c, 134_515_008) == 2   # and the whole model: 134.5 M / 64 = 2.0 chunks
    assert accelerator_span_chunks(50_331_648, c) == 8         # OPT-1.3B's: 48 chunks
    assert accelerator_span_chunks(50_331_648, c, 1_315_758_080) == 8   # 19.6 chunks of the model: the 8 stand
    assert accelerator_span_chunks(7_084_032, c, 125_239_296) == 1      # OPT-125M: 1.9 chunks of the model
    assert accelerator_span_chunks(1, c) == accelerator_span_chunks(c, c) == 1
    assert accelerator_span_chunks(c + 1, c) == 2
    assert accelerator_span_chunks(c, c, 1) == 1               # never below one chunk
    assert accelerator_span_chunks(None, c) == 8
    assert accelerator_span_chunks(None, c, 64 * 3 * c) == 3
