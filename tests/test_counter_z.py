"""The counter-based z sampler (ds_zo/triton_z.py, zero_order.z_sampler "philox"), run in Triton's interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU; tests/test_cuda.py runs the compiled kernel)."""
import re

import numpy as np
import pytest
import torch

import ds_zo
from ds_zo.perturb import PerturbationGenerator, counter_based_unavailable, mix, param_key, parse_z_stream, z_stream
from conftest import ds_config
from models import batch, tiny_model
from philox_reference import reference_z
from reference import MeZOReference

pytestmark = pytest.mark.skipif(counter_based_unavailable("cpu") is not None,
                                reason=f"counter-based sampler on CPU: {counter_based_unavailable('cpu')}")


KEY = mix(7, 0, param_key("model.layers.0.mlp.up_proj.weight"))


def _fill(n, start=0, key=KEY, scale=1.0, gaussian=True, quads=None):
    from ds_zo import triton_z
    out = torch.full((n,), float("nan"))
    return triton_z.fill(out, start, key, scale, gaussian, **({"quads": quads} if quads else {}))


@pytest.mark.parametrize("gaussian", [True, False])
def test_the_kernel_draws_the_documented_stream(gaussian):
    for start, n in [(0, 4096), (3, 1000), (1 << 33, 17)]:      # a counter above 2^32 uses its high word
        got = _fill(n, start, gaussian=gaussian).numpy()
        np.testing.assert_array_equal(got, reference_z(KEY, start, n, gaussian), err_msg=f"start {start}")


def test_any_slice_is_the_slice_of_the_whole_whatever_the_program_size():
    whole = _fill(9000)
    assert torch.isfinite(whole).all()
    for start, n in [(0, 1), (1, 2), (2, 7), (5, 4000), (4093, 3000), (8999, 1), (4, 8996)]:
        assert torch.equal(_fill(n, start), whole[start:start + n]), (start, n)
        assert torch.equal(_fill(n, start, quads=4), whole[start:start + n]), (start, n)   # many small programs


def test_scale_is_one_float32_multiply_and_keys_are_independent():
    z = _fill(5000)
    for scale in (1e-3, -2.5, 0.0, 3.0e38):
        assert torch.equal(_fill(5000, scale=scale), z * scale), scale       # exactly z.mul_(scale)
    other = _fill(5000, key=KEY + 1)
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.05
    assert not torch.equal(z, other)


def test_gaussian_and_rademacher_moments():
    z = _fill(1 << 18).double()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z ** 4).mean() - 3) < 0.05                   # Gaussian kurtosis
    assert abs(float(torch.corrcoef(torch.stack([z[0::4], z[1::4]]))[0, 1])) < 0.01   # a Box-Muller pair
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 0.01
    r = _fill(1 << 16, gaussian=False, scale=0.5)
    assert set(r.unique().tolist()) == {-0.5, 0.5} and abs(r.mean()) < 0.02


def test_the_generator_draws_every_slice_in_one_launch_with_no_chunk_seams():
    gen = PerturbationGenerator(sampler="philox", chunk_elements=1024)
    assert gen.counter_based("cpu")
    n = 5000
    whole = gen.z(11, 0, 99, n)
    np.testing.assert_array_equal(whole.numpy(), reference_z(mix(11, 0, 99), 0, n))
    assert torch.equal(gen.z(11, 0, 99, n, 1000, 3100), whole[1000:3100])   # across the chunked stream's seams
    assert torch.equal(gen.z(11, 1, 99, n)[:10], torch.from_numpy(reference_z(mix(11, 1, 99), 0, 10)))
    with pytest.raises(ValueError, match="outside a parameter of 5000 elements"):
        gen.z(11, 0, 99, n, 4000, 5001)
    with pytest.raises(ValueError, match="contiguous"):
        gen.fill(torch.empty(20)[::2], 11, 0, 99, n)
    # the native fused CPU passes draw the chunked stream: they must not run for this sampler (the Triton ones do)
    assert gen._fused_kernels([1.0]) is None and gen.fuses("cpu", torch.float32)
    assert PerturbationGenerator(sampler="auto").counter_based("cpu") is False     # auto: chunked off CUDA


def test_which_sampler_draws_where(monkeypatch):
    """chunked: never counter-based; auto: on CUDA where the kernel can run; philox: wherever it can run, refused by
    name elsewhere. The native fused CPU passes (which draw the chunked stream) never run for a philox generator,
    and asking whether they do does not raise where that generator could not draw on the CPU (a GPU run)."""
    import ds_zo.perturb as perturb
    monkeypatch.setattr(perturb, "counter_based_unavailable", lambda device: None)     # as on a GPU with Triton
    assert [PerturbationGenerator(sampler=s).counter_based("cuda") for s in ("chunked", "auto", "philox")] == \
        [False, True, True]
    assert [PerturbationGenerator(sampler=s).counter_based("cpu") for s in ("chunked", "auto", "philox")] == \
        [False, False, True]
    monkeypatch.setattr(perturb, "counter_based_unavailable", lambda device: "no Triton here")
    assert [PerturbationGenerator(sampler=s).counter_based("cuda") for s in ("chunked", "auto")] == [False, False]
    with pytest.raises(ValueError, match="z_sampler 'philox' cannot draw on cuda: no Triton here"):
        PerturbationGenerator(sampler="philox").counter_based("cuda")
    philox = PerturbationGenerator(sampler="philox")
    assert philox._fused_kernels([1.0]) is None and not philox.fuses("cpu", torch.float32)
    assert not philox.draw_groups(torch.empty(64), 9, 0.5, torch.ones(4, dtype=torch.uint8))


def test_the_slice_key_is_mix_of_its_three_integers():
    from ds_zo.perturb import slice_key
    for seed, index, key in [(0, 0, 0), (11, 1, 99), ((1 << 64) - 1, 3, (1 << 63) + 5), (-1, 2, 7)]:
        assert slice_key(seed, index, key) == mix(seed, index, key)
        hits = slice_key.cache_info().hits
        assert slice_key(seed, index, key) == mix(seed, index, key)       # kept: a step's update asks again
        assert slice_key.cache_info().hits == hits + 1


def test_stream_names():
    assert re.fullmatch(r"cpu-philox/[0-9a-f]{8}", z_stream("cpu", True)) and z_stream("cpu") == "cpu"
    assert parse_z_stream("cuda-philox/9.0") == ("cuda", "philox")
    assert parse_z_stream("cuda/132x2048") == ("cuda", "chunked") and parse_z_stream("cpu") == ("cpu", "chunked")


def test_an_engine_on_the_counter_based_sampler_matches_the_plain_mezo_loop_bitwise(tmp_path):
    model = tiny_model("llama", tied=True)
    ref = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3, sampler="philox")
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3,
                                                                z_sampler="philox"))
    assert engine.z_stream == z_stream("cpu", True) and engine.perturbations.counter_based("cpu")
    b = batch()
    for _ in range(2):
        loss = engine.train_batch(b)
        ref_loss, ref_g = ref.step(b)
        assert loss == ref_loss and engine.last_projected_grad == ref_g[0]
    sd = engine.module_state_dict()
    for n, p in ref.params().items():
        assert torch.equal(sd[n], p), n
    # and it is another stream than the chunked one: the same run there takes other steps
    chunked = MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3, sampler="chunked")
    assert chunked.step(b)[1][0] != MeZOReference(model, lr=1e-2, eps=1e-3, wd=0.1, seed=3,
                                                  sampler="philox").step(b)[1][0]
    engine.save_checkpoint(str(tmp_path))
    from ds_zo.checkpoint import read_state
    assert read_state(str(tmp_path), None)[1]["z_stream"] == z_stream("cpu", True)


def test_philox_where_it_cannot_run_is_refused_by_name(monkeypatch):
    from ds_zo import triton_z
    # on a GPU the interpreter would draw z with numpy: another stream than the compiled kernel's
    assert "Triton's interpreter is on" in counter_based_unavailable("cuda")
    monkeypatch.setattr(triton_z, "INTERPRETED", False)      # as where the kernels are compiled: CPU cannot run them
    with pytest.raises(ValueError, match="z_sampler 'philox' cannot draw on cpu: on CPU it runs only in Triton's "
                                         "interpreter"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(z_sampler="philox"))
    with pytest.raises(ValueError, match="zero_order.z_sampler"):
        ds_zo.initialize(model=tiny_model("llama"), config=ds_config(z_sampler="mt19937"))


def test_a_resumed_run_keeps_the_sampler_it_drew_with_unless_one_is_named(tmp_path):
    """z_sampler "auto" resumes on the sampler the checkpoint's z stream names (GPU runs drew chunk by chunk until the
    sixteenth session, and "auto" picks the counter-based one there now): the resumed steps are the uninterrupted
    run's, and the log stays replayable. A sampler named in the config is kept (the log then mixes two streams)."""
    import copy
    from ds_zo.replay import replay
    base = tiny_model("llama", tied=True)
    cfg = dict(lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    straight, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(z_sampler="philox", **cfg))
    first, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(z_sampler="philox", **cfg))
    for t in range(2):
        straight.train_batch(batch(seed=t))
        first.train_batch(batch(seed=t))
    first.save_checkpoint(str(tmp_path))
    resumed, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(**cfg))     # "auto": chunked on CPU
    assert resumed.z_stream == "cpu"
    resumed.load_checkpoint(str(tmp_path))
    assert resumed.z_stream == z_stream("cpu", True) and resumed.perturbations.counter_based("cpu")
    for t in range(2, 4):
        assert resumed.train_batch(batch(seed=t)) == straight.train_batch(batch(seed=t))
    want = straight.module_state_dict()
    assert all(torch.equal(p, want[n]) for n, p in resumed.module_state_dict().items())
    # the Python replay's default picks as the engine's "auto" does on the model's device: chunked on CPU
    replayed = replay(copy.deepcopy(base), resumed.step_log, sampler="philox")
    assert all(torch.equal(p, want[n]) for n, p in replayed.state_dict().items() if n in want)
    named, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(z_sampler="chunked", **cfg))
    named.load_checkpoint(str(tmp_path))
    assert named.z_stream == f"mixed({z_stream('cpu', True)}, cpu)"
