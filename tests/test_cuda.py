"""CUDA code paths; skipped where CUDA is absent (CI), run on a GPU machine."""
import re

import pytest
import torch

from ds_zo.model.dual_forward import dual_forward
from ds_zo.model.perturbed_copies import PerturbedCopies
from ds_zo.model.units import cut_into_units, resolve_trainable
from ds_zo.optimizer import StepRecord, apply_step
from ds_zo.perturb import PerturbationGenerator, counter_based_unavailable, mix, param_key
from models import batch, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


triton = pytest.mark.skipif(not torch.cuda.is_available() or counter_based_unavailable("cuda") is not None,
                            reason="needs CUDA and Triton")
SAMPLERS = ["chunked", pytest.param("philox", marks=triton)]


@cuda
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_slices_equal_whole_and_are_deterministic(sampler):
    gen = PerturbationGenerator(chunk_elements=1024, sampler=sampler)
    whole = gen.z(3, 0, 7, 5000, device="cuda")
    assert whole.device.type == "cuda" and gen.counter_based("cuda") == (sampler == "philox")
    assert torch.equal(gen.z(3, 0, 7, 5000, 1000, 3500, device="cuda"), whole[1000:3500])
    assert torch.equal(PerturbationGenerator(chunk_elements=1024, sampler=sampler).z(3, 0, 7, 5000, device="cuda"),
                       whole)


@triton
@pytest.mark.parametrize("gaussian", [True, False])
def test_cuda_counter_based_kernel_draws_the_documented_stream(gaussian):
    """Compiled, the kernel gives tests/philox_reference.py's values: the Philox words exactly (Rademacher z is
    their top bits), the Gaussian values to float32 rounding of the GPU's log, sin and cos; any slice, any program
    size, gives the same values bit for bit."""
    from ds_zo import triton_z
    from philox_reference import reference_z
    key, n = mix(5, 0, param_key("model.embed_tokens.weight")), 300_001
    whole = triton_z.fill(torch.empty(n, device="cuda"), 0, key, 1.0, gaussian)
    want = torch.from_numpy(reference_z(key, 0, n, gaussian))
    if gaussian:
        torch.testing.assert_close(whole.cpu(), want, rtol=1e-5, atol=2e-6)
    else:
        assert torch.equal(whole.cpu(), want)
    for start, m in [(1, 5), (4093, 70_000), (299_999, 2)]:
        for quads in (4, triton_z.QUADS):
            got = triton_z.fill(torch.empty(m, device="cuda"), start, key, 1.0, gaussian, quads)
            assert torch.equal(got, whole[start:start + m]), (start, m, quads)
    far = triton_z.fill(torch.empty(9, device="cuda"), 1 << 33, key, 1.0, gaussian)     # the counter's high word
    torch.testing.assert_close(far.cpu(), torch.from_numpy(reference_z(key, 1 << 33, 9, gaussian)), rtol=1e-5,
                               atol=2e-6)


@cuda
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cuda_scaled_draws_equal_z_times_scale(distribution, sampler):
    """The sampler applies ε (and |g|) itself: on CUDA too, exactly what a separate z.mul_(scale) gives."""
    gen = PerturbationGenerator(distribution, chunk_elements=4096, sampler=sampler)
    z = gen.z(4, 1, 9, 10_000, device="cuda")
    for s in (1e-3, 0.37, 123.5, 0.0, -2.0):
        out = torch.empty(10_000, device="cuda")
        gen.fill(out, 4, 1, 9, 10_000, scale=s)
        assert torch.equal(out.view(torch.int32), (z * s).view(torch.int32)), s


@cuda
def test_cuda_dual_forward_equals_two_forwards_and_update_matches_formula():
    model = tiny_model("llama").cuda().eval()
    b = {k: v.cuda() for k, v in batch().items()}
    units = cut_into_units(model, resolve_trainable(model, []))
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    gen = PerturbationGenerator()
    copies = PerturbedCopies(gen, keys, 1e-2)
    copies.set_slots(11, [(0, 1), (0, -1)])
    with torch.no_grad(), dual_forward(units, 2, 2, copies):
        dual = model(input_ids=torch.cat([b["input_ids"]] * 2), attention_mask=torch.cat([b["attention_mask"]] * 2),
                     use_cache=False).logits
    with torch.no_grad():
        plus_params = {n: p + 1e-2 * gen.z(11, 0, param_key(n), p.numel(), device="cuda").view_as(p)
                       for n, p in model.named_parameters()}
        plus = torch.func.functional_call(model, plus_params, args=(),
                                          kwargs=dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                      use_cache=False)).logits
    torch.testing.assert_close(dual[:2], plus, rtol=1e-5, atol=1e-6)
    p = next(model.parameters())
    before = p.detach().clone()
    rec = StepRecord(step=0, seed=11, g=(0.5,), lr=1e-2, wd=0.0)
    apply_step(p.data, keys[id(p)], rec, True, gen)
    z = gen.z(11, 0, keys[id(p)], p.numel(), device="cuda").view_as(p)
    torch.testing.assert_close(p.detach(), before - 1e-2 * (0.5 * z), rtol=0, atol=0)


def _pipeline_on_cuda(depth=1, overlap=True, storage=None):
    from ds_zo.offload import OffloadPipeline, ParameterStore
    model = tiny_model("llama").eval()
    units = cut_into_units(model, resolve_trainable(model, []))
    layers = [u for u in units if u.is_layer]
    store = ParameterStore(layers, storage, pin=True)
    stored = {id(p) for s in store.units.values() for p in s.params}
    for p in model.parameters():
        if id(p) not in stored:
            p.data = p.data.cuda()
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.cuda()
    pipe = OffloadPipeline(store, layers, torch.device("cuda"), depth, overlap)
    return model, units, store, pipe


def _streamed_logits(model, units, pipe, seed=3):
    keys = {id(p): param_key(n) for n, p in model.named_parameters()}
    copies = PerturbedCopies(PerturbationGenerator(), keys, 1e-2, residency=pipe)
    copies.set_slots(seed, [(0, 1), (0, -1)])
    b = {k: v.cuda() for k, v in batch().items()}
    with torch.no_grad(), dual_forward(units, 2, 2, copies):
        pipe.begin()
        return model(input_ids=torch.cat([b["input_ids"]] * 2), attention_mask=torch.cat([b["attention_mask"]] * 2),
                     use_cache=False).logits


@cuda
def test_cuda_store_is_pinned_and_streams_are_separate():
    model, units, store, pipe = _pipeline_on_cuda()
    assert all(s.flat.is_pinned() and s.flat.device.type == "cpu" for s in store.units.values())
    assert all(b.device.type == "cuda" for b in pipe.buffers)
    st = pipe.streams
    assert st.h2d != st.compute and st.d2h != st.compute and st.h2d != st.d2h


@cuda
@pytest.mark.parametrize("depth, overlap", [(1, True), (2, True), (1, False)])
def test_cuda_offload_equals_resident(depth, overlap):
    model, units, store, pipe = _pipeline_on_cuda(depth, overlap)
    streamed = _streamed_logits(model, units, pipe)
    resident = tiny_model("llama").eval().cuda()
    r_units = cut_into_units(resident, resolve_trainable(resident, []))
    keys = {id(p): param_key(n) for n, p in resident.named_parameters()}
    copies = PerturbedCopies(PerturbationGenerator(), keys, 1e-2)
    copies.set_slots(3, [(0, 1), (0, -1)])
    b = {k: v.cuda() for k, v in batch().items()}
    with torch.no_grad(), dual_forward(r_units, 2, 2, copies):
        ref = resident(input_ids=torch.cat([b["input_ids"]] * 2), attention_mask=torch.cat([b["attention_mask"]] * 2),
                       use_cache=False).logits
    assert torch.equal(streamed, ref)


@cuda
def test_cuda_stream_switch_makes_the_stream_current_then_the_compute_stream_again():
    """Streams.on(s), made once per stream, instead of torch.cuda.stream(s) (host time on every unit visit): s is
    current inside, the compute stream after, also when the block raises."""
    model, units, store, pipe = _pipeline_on_cuda()
    st = pipe.streams
    assert st.on(st.h2d) is st.on(st.h2d) and st.on(st.h2d) is not st.on(st.d2h)
    for stream in (st.h2d, st.d2h):
        with st.on(stream):
            assert torch.cuda.current_stream() == stream
        assert torch.cuda.current_stream() == st.compute
    with pytest.raises(KeyError):
        with st.on(st.h2d):
            raise KeyError("inside")
    assert torch.cuda.current_stream() == st.compute and torch.cuda.current_device() == st.compute.device_index
    with pytest.raises(RuntimeError, match="entered again inside itself"):
        with st.on(st.h2d):
            with st.on(st.h2d):
                pass
    assert torch.cuda.current_stream() == st.compute
    with st.on(st.h2d):                       # usable again after the refused nesting
        assert torch.cuda.current_stream() == st.h2d


@cuda
def test_cuda_steady_state_loop_never_synchronizes_the_host(monkeypatch):
    model, units, store, pipe = _pipeline_on_cuda(depth=2)
    _streamed_logits(model, units, pipe)  # warm-up: allocations, cuBLAS handles

    def forbidden(*_a, **_k):
        raise AssertionError("host synchronisation inside the offload pipeline")
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", forbidden)
    # (Event.wait(stream) is not patched: it is the device-side wait that Stream.wait_event itself calls)
    pipe.trace = []
    _streamed_logits(model, units, pipe, seed=4)
    assert [op for op, _ in pipe.trace].count("upload") == 2


@cuda
def test_cuda_host_tensors_travel_through_the_staging_device():
    """NCCL moves device memory only: a host tensor (the float64 loss totals) is staged on the GPU and copied back."""
    from ds_zo.parallel.communicator import Communicator
    from ds_zo.parallel.dims import ParallelDims
    comm = Communicator(ParallelDims(world=2, rank=0), 5.0, staging_device=torch.device("cuda"))
    seen = []
    host = torch.tensor([1.0, 2.0], dtype=torch.float64)
    comm._run_on_device(host, lambda t: (seen.append(t.device.type), t.mul_(3)))
    assert seen == ["cuda"] and host.tolist() == [3.0, 6.0]
    dev = torch.ones(2, device="cuda")
    comm._run_on_device(dev, lambda t: (seen.append(t.data_ptr() == dev.data_ptr()), t.add_(1)))
    assert seen[-1] is True and dev.tolist() == [2.0, 2.0]     # device tensors go straight to the collective


@cuda
def test_cuda_upload_timing_events():
    model, units, store, pipe = _pipeline_on_cuda(depth=2)
    pipe.time_transfers = True
    _streamed_logits(model, units, pipe)
    pipe.time_transfers = False
    n = len(pipe._transfer_times)
    rate = pipe.h2d_transfer_rate()
    assert n == len(pipe.order) and rate is not None and 1e8 < rate < 1e12   # bytes/s of real PCIe copies
    stall = pipe.upload_stall_s()                 # seconds compute waited for uploads, read from timing events
    assert stall is not None and 0 <= stall < 10


def offload_job(tmp_path, accelerator: str, steps: int = 4):
    """The fine-tuning job (python -m ds_zo.train) on the tiny model with ZeRO-3 parameter offload, one process."""
    import json
    import os
    from ds_zo.parallel.local_ranks import ROOT
    from test_job import _job, _write_csv
    _write_csv(tmp_path / "train.csv", 32, 1)
    _write_csv(tmp_path / "test.csv", 16, 2)
    out = tmp_path / "run"
    proc = _job(out, tmp_path, "--trainable", "all", "--deepspeed_config",
                os.path.join(ROOT, "configs", "zo_sgd_tiny_zero3_offload.json"), steps=steps, accelerator=accelerator)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == accelerator and summary["steps"] == steps
    assert 0.0 <= summary["results"]["final_test"]["accuracy"] <= 1.0
    steps_log = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps_log) == steps and all(abs(g) < float("inf") and g != 0 for r in steps_log for g in r["g"])
    return summary


@cuda
@pytest.mark.timeout(300)
def test_cuda_fine_tuning_job_with_zero3_offload(tmp_path):
    offload_job(tmp_path, "cuda")


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_fine_tuning_job_with_zero3_offload_on_cpu(tmp_path):
    """The CUDA job test's own check, on CPU (CI): the same job, scheduler and assertions."""
    offload_job(tmp_path, "cpu")


@cuda
def test_cuda_spans_of_several_chunks_give_the_same_parameters():
    """On a GPU each element-wise pass covers accelerator_span_chunks z chunks: 1, 3 and 8 give identical steps."""
    import copy
    import ds_zo
    from conftest import ds_config
    base = tiny_model("llama", True)
    states = []
    for span in (1, 3, 8):
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(lr=1e-2, eps=1e-3, wd=0.1))
        assert engine.device.type == "cuda"
        engine.perturbations.chunk = 100                  # many chunks per parameter
        engine.perturbations.accelerator_span_chunks = span
        losses = [engine.train_batch(batch(seed=t)) for t in range(3)]
        states.append((losses, engine.module_state_dict()))
    for losses, sd in states[1:]:
        assert losses == states[0][0]
        assert all(torch.equal(sd[n], states[0][1][n]) for n in sd)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("sampler", ["chunked", "philox"])
@pytest.mark.parametrize("offload", [False, True])
def test_engine_matches_the_plain_mezo_loop_on_either_sampler(device, sampler, offload):
    """The engine against tests/reference.py on the same device and sampler, resident and offloaded: the loss and g
    to cuBLAS's rounding (on a GPU the engine's forward runs both signs as one doubled batch), and each step's update
    exactly θ − lr·(g·z + wd·θ) with the reference sampler's z; the z stream is recorded as the sampler's. On CPU
    (the philox sampler in Triton's interpreter) the same checks."""
    import copy
    import ds_zo
    from conftest import ds_config
    from ds_zo.perturb import z_stream
    from reference import MeZOReference
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator().device_name()
    if accelerator != device:   # the engine's device is DeepSpeed's accelerator, one per process (DS_ACCELERATOR)
        pytest.skip(f"the {device} case needs DeepSpeed's accelerator on {device}; this process's is {accelerator}")
    why = counter_based_unavailable(device)
    if sampler == "philox" and why:
        pytest.skip(f"counter-based sampler: {why}")
    base = tiny_model("llama", True)
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, z_sampler=sampler)
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
    assert engine.device.type == device and engine.z_stream == z_stream(device, sampler == "philox")
    gen = PerturbationGenerator(sampler=sampler)
    for t in range(3):
        b = batch(seed=t)
        # copies: resident parameters (and the embedding, resident with offload) are the state dict's own tensors
        before = {n: p.detach().float().to(device, copy=True) for n, p in engine.module_state_dict().items()}
        ref = MeZOReference(copy.deepcopy(base).to(device), lr=1e-2, eps=1e-3, wd=0.1, sampler=sampler)
        ref.model.load_state_dict(before)
        ref.seed, ref.step_count = 3, t
        loss = engine.train_batch(b)
        ref_loss, ref_g = ref.step({k: v.to(device) for k, v in b.items()})
        g, seed = engine.last_projected_grad, engine.step_log[-1].seed
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert g == pytest.approx(ref_g[0], rel=2e-2, abs=2e-2), t
        after = engine.module_state_dict()
        for n, p in engine.module.named_parameters():
            z = gen.z(seed, 0, param_key(n), p.numel(), device=device).view(p.shape)
            step = g * z + 0.1 * before[n] if p.dim() > 1 else g * z
            torch.testing.assert_close(after[n].to(device), before[n] - 1e-2 * step, rtol=1e-6, atol=1e-8,
                                       msg=lambda m: f"step {t}, {n}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_master_widens_inside_the_kernel(device, dtype):
    """θ ± ε·z and θ −= u on a 16-bit θ are issued as one mixed-dtype op (torch.add(θ16, x32, out=θ16)): the same
    values as widening θ to float32 first and rounding the float32 result once."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(1 << 16, generator=g) * 0.05).to(dtype).to(device)
    x = (torch.randn(1 << 16, generator=g) * 1e-3).to(device)
    out = torch.empty_like(base)
    for op in (torch.add, torch.sub):
        expected = op(base.float(), x).to(dtype)
        op(base, x, out=out)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
        flat = base.clone()
        op(flat, x, out=flat)                      # in place, as the update writes θ
        assert torch.equal(flat.view(torch.int16), expected.view(torch.int16))


@cuda
def test_cuda_z_stream_names_the_sampler_grid():
    from ds_zo.perturb import z_stream
    props = torch.cuda.get_device_properties(0)
    threads = getattr(props, "max_threads_per_multi_processor", 0)     # (0 where torch does not expose it)
    assert z_stream("cuda") == f"cuda/{props.multi_processor_count}x{threads}"
    assert z_stream(torch.device("cuda", 0)) == z_stream("cuda")
    if counter_based_unavailable("cuda") is None:
        assert re.fullmatch(rf"cuda-philox/{props.major}\.{props.minor}/[0-9a-f]{{8}}", z_stream("cuda", True))
    assert z_stream("cpu") == "cpu"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_loss_matches_a_float64_cross_entropy(dtype):
    """On a GPU the loss takes windows of 8192 columns and tiles of 2^21 logits: still the cross-entropy of the logits
    as given to float32 rounding, ignored labels included."""
    from ds_zo.loss import IGNORE_INDEX, token_loss_sum
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 300, 50272, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50272, (2, 300), generator=g)
    labels[0, :7] = IGNORE_INDEX
    total, count = token_loss_sum(logits.cuda(), labels.cuda())
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
    assert count == 2 * 299 - 6
    assert total == pytest.approx(expected, rel=1e-6)


@cuda
def test_queued_device_time_counts_the_kernels_not_the_host():
    """The GPU calibration's device rates: a call whose host is slow between its launches (here 4 ms of sleep per
    launch of a microsecond kernel) is timed queued behind a sleep kernel, so the host's gaps do not count; issued
    unqueued they do."""
    import time

    from benchmarks.device_calibrate import device_time, queued_device_time
    x = torch.zeros(1024, device="cuda")

    def slow_host():
        for _ in range(5):
            x.add_(1)
            time.sleep(0.004)
    assert device_time(slow_host, x.device, 3) > 0.015
    assert queued_device_time(slow_host, x.device, 3) < 0.005


@cuda
def test_the_memcpy_baseline_times_each_direction_alone_and_beside_the_other():
    """offload_bench.memcpy_baseline: pinned copies' rates alone and with both directions running at once (the rates
    the model takes for the offload pipeline). Beside the other, a direction is not faster than alone by more than
    the timing's noise, and both move data at all."""
    from benchmarks.offload_bench import memcpy_baseline
    r = memcpy_baseline(1 << 26, reps=3)
    for d in ("h2d", "d2h"):
        assert 1.0 < r[f"{d}_duplex_GBps"] < 1.2 * r[f"{d}_GBps"], r


@cuda
@pytest.mark.timeout(300)
def test_memory_probe_measures_the_gpu_peak():
    """benchmarks.memory_probe --device cuda: each mode's peak GPU memory counts the model's parameters on the GPU
    (inference: moved there; ds_zo all-resident: placed there by the engine) plus the mode's working memory."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
                                                                "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DS_ACCELERATOR")}
    res = {}
    for mode in ("inference", "dszo", "dszo_offload"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", "--device", "cuda", "--mode", mode,
                              "--shape", "tiny", "--rows", "2", "--seq", "8"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(r["device"] == "cuda" and r["dtype"] == "bfloat16" for r in res.values())
    for mode in ("inference", "dszo"):
        assert res[mode]["peak_gpu"] > res[mode]["model_bytes"] > 0
    assert 0 < res["dszo_offload"]["peak_gpu"]


@cuda
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_row_blocks_on_trains_like_whole_copies_without_them(arch):
    """zero_order.row_blocks "on" on a GPU: the embedding and output layer compute from row blocks of their working
    copies (blocks of a span of 100-element chunks here, so several) and the loss takes the output layer's blocks,
    so no whole copy of them and no slot's logits exist; the steps are the whole-copy path's to the rounding of
    cuBLAS's block matmuls (fp32)."""
    import copy
    import ds_zo
    from conftest import ds_config
    base = tiny_model(arch, True)
    runs = {}
    for row_blocks in ("off", "on"):
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=ds_config(
            lr=1e-2, eps=1e-3, wd=0.1, row_blocks=row_blocks))
        assert engine.device.type == "cuda"
        engine.perturbations.chunk = 100
        losses = [engine.train_batch(batch(seed=t)) for t in range(3)]
        runs[row_blocks] = (losses, engine.last_projected_grad, engine.module_state_dict(), engine._stream_loss,
                            engine.copies.buffers.nbytes("rows"))
    (l_off, g_off, sd_off, stream_off, rows_off), (l_on, g_on, sd_on, stream_on, rows_on) = runs["off"], runs["on"]
    assert stream_on and not stream_off
    assert rows_on > 0 == rows_off                    # row-block buffers: only where the units stream
    # logits a few ulp apart move L by ~1e-6 relative and g = ΔL / 2ε by ~5e-4; three updates of lr·g·z (1e-2 each)
    # then differ by ~1e-5
    assert l_on == pytest.approx(l_off, rel=1e-5) and g_on == pytest.approx(g_off, rel=1e-3, abs=1e-3)
    assert all(torch.allclose(sd_on[k], sd_off[k], rtol=0, atol=1e-4) for k in sd_off)


@cuda
def test_cuda_update_scratch_is_per_stream():
    """A resliced unit's shard is updated on the all-gather's stream while the compute stream updates resident units:
    each stream gets its own scratch (the generator's spans, which the update uses, and its partial-chunk buffer),
    so the two updates never write the same memory."""
    gen = PerturbationGenerator()
    dev = torch.device("cuda", torch.cuda.current_device())
    mine, chunk = gen.span_scratch(dev), gen._scratch_chunk(dev)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        other, other_chunk = gen.span_scratch(dev), gen._scratch_chunk(dev)
    assert other[0].data_ptr() != mine[0].data_ptr() and gen.span_scratch(dev) is mine
    assert other_chunk.data_ptr() != chunk.data_ptr() and gen._scratch_chunk(dev) is chunk
    assert len(gen._spans) == 2 and gen.span_scratch_nbytes() == 2 * 4 * gen.span(dev)


@cuda
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_narrower_storage_trains_alike_fused_flushed_and_eager(depth):
    """offload_dtype bf16 on a GPU: a fused update is rounded to the store's dtype on the compute stream, through the
    buffer's staging tensor, while other units' uploads and offloads run on their own streams (and use their own
    staging). Fused, flushed (a state dict read between steps) and eager updates give identical steps."""
    import copy
    import ds_zo
    from conftest import ds_config
    base = tiny_model("llama", True)

    def run(between=None, **zo):
        cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, offload_dtype="bf16", prefetch_depth=depth, **zo)
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
        assert engine.device.type == "cuda" and engine.pipeline.staging[0] is not None
        losses = []
        for t in range(3):
            losses.append(engine.train_batch(batch(seed=t)))
            if between is not None:
                between(engine)
        return losses, engine.module_state_dict()

    fused = run()
    for other in (run(lambda e: e.module_state_dict()), run(fuse_update=False)):
        assert other[0] == fused[0]
        assert all(torch.equal(p, other[1][n]) for n, p in fused[1].items())


@cuda
def test_cuda_a_pass_under_another_stream_is_refused():
    """The pipeline orders its uploads and write-backs around the compute stream it was built with; a pass begun
    under another current stream would compute without waiting for its uploads: refused, by name."""
    model, units, store, pipe = _pipeline_on_cuda()
    with torch.cuda.stream(torch.cuda.Stream()):
        with pytest.raises(RuntimeError, match="computes on the CUDA stream that was current"):
            pipe.begin()
    assert torch.isfinite(_streamed_logits(model, units, pipe)).all()      # on its own stream it runs


@cuda
def test_cuda_eager_updates_are_in_the_parameters_when_train_batch_returns():
    """fuse_update false keeps module.parameters() current for users who read them directly: train_batch returns
    after the offloaded units' write-backs have landed in the pinned store the parameters point at (they were
    still in flight on their stream)."""
    import ds_zo
    from conftest import ds_config
    cfg = ds_config(lr=1e-2, eps=1e-3, seed=3, fuse_update=False)
    cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
    for t in range(2):
        engine.train_batch(batch(seed=t))
        assert engine.pipeline.streams.d2h.query() and engine.pipeline.streams.h2d.query()   # nothing in flight
        raw = {n: p.detach().clone() for n, p in engine.module.named_parameters()}   # no hook: the bytes as they are
        assert engine.optimizer.pending is None
        flushed = engine.module_state_dict()
        assert all(torch.equal(raw[n].cpu(), flushed[n].cpu()) for n in raw)


@cuda
@pytest.mark.parametrize("stage,depth", [(0, 1), (0, 2), (3, 1)])
def test_cuda_delayed_streams_train_bit_for_bit_alike(monkeypatch, stage, depth):
    """Tiny models finish each copy long before the next stream needs it, so a missing event wait rarely shows on a
    GPU. Here every upload, write-back and all-gather starts late (a spin kernel queued first on its stream) and the
    compute stream lingers on each offloaded unit: any consumer that does not wait for its producer reads stale
    memory, and the run differs from an undelayed one. (tests/test_stream_order.py checks the same ordering on CPU.)"""
    import copy
    import ds_zo
    from conftest import ds_config
    from ds_zo.offload.pipeline import OffloadPipeline
    from ds_zo.parallel.communicator import Communicator
    base = tiny_model("llama", True)

    def run():
        cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, offload_dtype="bf16", prefetch_depth=depth)
        cfg["zero_optimization"] = {"stage": stage, "offload_param": {"device": "cpu", "pin_memory": True}}
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
        losses = [engine.train_batch(batch(seed=t)) for t in range(3)]
        state = engine.module_state_dict()
        engine.destroy()
        return losses, state

    plain = run()

    def late(method):
        def delayed(*args, **kwargs):
            torch.cuda._sleep(20_000_000)          # ~10 ms of spinning on the stream current for this operation
            return method(*args, **kwargs)
        return delayed

    def lingering(self, unit):
        OffloadPipeline_enter(self, unit)
        torch.cuda._sleep(20_000_000)
    OffloadPipeline_enter = OffloadPipeline.enter
    monkeypatch.setattr(OffloadPipeline, "_copy_in", late(OffloadPipeline._copy_in))
    monkeypatch.setattr(OffloadPipeline, "_copy_out", late(OffloadPipeline._copy_out))
    monkeypatch.setattr(OffloadPipeline, "enter", lingering)
    monkeypatch.setattr(Communicator, "all_gather_shards", late(Communicator.all_gather_shards))
    delayed = run()
    assert delayed[0] == plain[0]
    assert all(torch.equal(p, delayed[1][n]) for n, p in plain[1].items())
