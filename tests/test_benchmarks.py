"""The benchmark baselines compute what the published algorithms say, and the runner's pieces work end to end on a
tiny model."""
import copy
import math
import os
import sys

import pytest
import torch
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.baselines import AdamWStep, InferenceForward, MeZOLoop, make_batch  # noqa: E402
from benchmarks.models import build  # noqa: E402


@pytest.fixture(scope="module")
def tiny64():
    return build("tiny", dtype=torch.float64)


def direct_spsa(model, seed, batch, lr, eps, wd):
    """MeZO's step written out: z from torch.manual_seed(seed), parameter by parameter in named_parameters() order;
    L± at θ ± εz through functional_call; g = (L+ − L−)/2ε; θ − lr·(g·z + wd·θ), no decay for 1-D tensors."""
    params = dict(model.named_parameters())
    torch.manual_seed(seed)
    z = {n: torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype) for n, p in params.items()}

    def loss(sign):
        shifted = {n: p.detach() + sign * eps * z[n] for n, p in params.items()}
        return functional_call(model, shifted, args=(), kwargs=dict(batch, use_cache=False)).loss.item()

    with torch.no_grad():
        lp, lm = loss(+1), loss(-1)
        g = (lp - lm) / (2 * eps)
        new = {n: p.detach() - lr * (g * z[n] + (wd * p.detach() if p.dim() >= 2 else 0)) for n, p in params.items()}
    return lp, g, new


@pytest.mark.parametrize("style", ["inplace", "published"])
def test_mezo_loop_is_the_spsa_step(tiny64, style):
    batch = make_batch(256, rows=2, seq=8, seed=3)
    lr, eps, wd = 1e-2, 1e-3, 0.1
    loop = MeZOLoop(copy.deepcopy(tiny64), lr=lr, eps=eps, weight_decay=wd, seed=7, style=style)
    loss_plus, g = loop.step(batch)
    lp, g_ref, new = direct_spsa(copy.deepcopy(tiny64), loop.step_seed, batch, lr, eps, wd)
    # HF's .loss is reduced in float32 even for a float64 model, so the in-place θ+εz−2εz and the direct θ−εz may
    # round L− one float32 ulp apart: g agrees to ~1e-7 relative, the parameters to lr·Δg·|z|
    assert loss_plus == pytest.approx(lp, rel=1e-7)
    assert g == pytest.approx(g_ref, rel=1e-5)
    assert abs(g) > 1e-2                                    # a real gradient signal, not a degenerate zero
    for n, p in loop.model.named_parameters():
        # a wrong z, sign or decay would be off by ~lr·|g| ≈ 1e-2 · |g|
        torch.testing.assert_close(p.detach(), new[n], rtol=1e-9, atol=1e-7 * lr * abs(g) * 10)
    n_params = sum(p.numel() for p in tiny64.parameters())
    assert loop.elements_drawn == 4 * n_params             # +1, −2, +1 and the update each regenerate z
    changed = sum(not torch.equal(p, q) for p, q in zip(loop.model.parameters(), tiny64.parameters()))
    assert changed == len(list(tiny64.parameters()))


def test_mezo_loop_restores_theta_before_the_update(tiny64):
    """lr = 0: +εz, −2εz, +εz must leave θ where it was (to rounding) and the update must not move it."""
    loop = MeZOLoop(copy.deepcopy(tiny64), lr=0.0, eps=1e-3, seed=1)
    loop.step(make_batch(256, 2, 8))
    for p, q in zip(loop.model.parameters(), tiny64.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_adamw_step_and_inference_forward(tiny64):
    batch = make_batch(256, 2, 8)
    model = copy.deepcopy(tiny64)
    with torch.no_grad():
        before = model(**batch).loss.item()
    assert InferenceForward(model).step(batch) == pytest.approx(before)
    step = AdamWStep(model, lr=1e-3)
    assert step.step(batch) == pytest.approx(before)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) after the update
    state = step.optimizer.state
    assert len(state) == len(list(model.parameters())) and all("exp_avg_sq" in s for s in state.values())
    after = InferenceForward(model).step(batch)
    assert after < before                                   # one AdamW step on the same batch lowers its loss


def test_perfmodel_shapes_match_the_benchmark_models():
    from ds_zo import perfmodel as pm
    for name in ("tiny", "small", "wide", "smollm2-135m"):
        model = build(name, device="meta")
        spec = pm.shape(name, 16)
        assert spec.params == sum(p.numel() for p in model.parameters())
        assert spec.layer_params() == sum(p.numel() for p in model.model.layers.parameters())
        assert sum(u.is_layer for u in spec.units) == len(model.model.layers)


def test_analytic_bytes_formulas():
    from benchmarks.dist_bench import analytic_bytes
    model = build("tiny")
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters())
    assert analytic_bytes(model, {}, 1) == {"h2d_bytes": 0, "d2h_bytes": 0, "allgather_bytes": 0,
                                            "allreduce_bytes": 0}
    assert analytic_bytes(model, {"offload": True}, 2)["h2d_bytes"] == layer_bytes
    shard = sum(math.ceil(p.numel() / 2) * 4 for p in model.model.layers.parameters())
    resliced = analytic_bytes(model, {"offload": True, "stage": 3}, 2)
    assert resliced == {"h2d_bytes": shard, "d2h_bytes": shard, "allgather_bytes": shard, "allreduce_bytes": 64}


def test_step_benchmark_smoke():
    """The step section on the tiny shape: every side runs, ratios and z counts are reported."""
    from benchmarks.run import bench_step
    res = bench_step("tiny", rows=2, seq=8, reps=1, full=False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert set(res["cpu"]) == {"dszo", "dszo_offload", "mezo", "inference"}
    assert res["z_per_param"]["mezo"] == pytest.approx(4.0)
    # ds_zo draws z once to perturb and once to update; the tied embedding forms only its ids' rows, whose ε·z the
    # head reuses (tests/test_engine_exactness.py pins the counts)
    assert res["z_per_param"]["dszo"] == pytest.approx(2.0)
    assert res["ratio_dszo_over_mezo_cpu"]["median"] > 0
    groups = res["profile"]["mezo"]["groups"]
    assert groups.get("z draws (normal_)", 0) > 0 and groups.get("forward (HF modules)", 0) > 0
    from ds_zo.perturb import PerturbationGenerator
    if PerturbationGenerator().fuses("cpu", torch.float32):    # the native build: its fused passes are profiled
        assert res["profile"]["dszo"]["groups"].get("z draws + element-wise, fused", 0) > 0


def test_calibrated_cpu_hardware_predicts_a_step():
    from benchmarks.calibrate import cpu_hardware
    from ds_zo import perfmodel as pm
    micro = {"rng_rate": 1e8, "host_chunk_s": 1e-5, "elem_bw": 1e10, "copy_bw": 5e9}
    hw = cpu_hardware(micro, {"flops": 1e10})
    assert not hw.overlap and hw.dtype_bytes == 4
    r = pm.simulate(pm.shape("tiny", 8), hw, pm.Layout("zo2"), pm.Workload(2, 8))
    assert r.busy == {"device": pytest.approx(r.step_s)}    # no overlap on a CPU "device": the sum of every op


@pytest.mark.slow
def test_memory_probe_runs_in_a_fresh_process():
    import json
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
                                                                "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", "--mode", "dszo", "--shape", "tiny",
                          "--rows", "2", "--seq", "8"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["hwm_reset"] and res["peak_rss"] >= res["rss_after_build"] > 0
    assert res["dszo_buffers"]["perturbed_copies"] > 0


def test_peak_breakdown_replays_an_allocator_trace():
    """The GPU probe's diagnosis of its peak: allocations count until their free completes (a block freed on one
    stream and still in use on another stays allocated), the live blocks at the highest total are grouped by the
    innermost frame of ds_zo / transformers / benchmarks code."""
    from benchmarks.memory_probe import peak_breakdown

    def frames(*where):
        return [{"filename": f, "line": n, "name": fn} for f, n, fn in where]
    torch_frame = ("/site/torch/functional.py", 10, "empty")
    ours = frames(torch_frame, ("/repo/ds_zo/perturb.py", 5, "span_scratch"), ("/repo/ds_zo/engine.py", 9, "step"))
    hf = frames(("/site/transformers/models/llama/modeling_llama.py", 7, "forward"))
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": hf},
        {"action": "free_requested", "addr": 2, "size": 50, "frames": hf},     # still in use: counts
        {"action": "alloc", "addr": 3, "size": 30, "frames": ours},            # the peak: 180
        {"action": "free_completed", "addr": 2, "size": 50, "frames": hf},
        {"action": "free_completed", "addr": 3, "size": 30, "frames": ours},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},              # 160: below the peak
        {"action": "segment_alloc", "addr": 9, "size": 10 ** 6, "frames": []},    # segments are not allocations
    ]
    res = peak_breakdown(trace)
    assert res["peak_bytes"] == 180 and res["blocks"] == 3 and res["rest_bytes"] == 0
    assert res["top"] == [{"where": "ds_zo/perturb.py:5 span_scratch (empty)", "blocks": 2, "bytes": 130},
                          {"where": "llama/modeling_llama.py:7 forward (forward)", "blocks": 1, "bytes": 50}]
    assert peak_breakdown(trace, top=1)["rest_bytes"] == 50
    assert peak_breakdown([])["peak_bytes"] == 0


@pytest.mark.slow
def test_concurrent_memory_probes_keep_what_succeeded():
    """The GPU check's way (probes at once): each probe's figure is kept, and a failed probe is recorded, not raised,
    so a GPU check's minutes are not lost to one mode."""
    from benchmarks.run import bench_memory
    res = bench_memory("tiny", 2, 8, 1, modes=("inference", "dszo", "no_such_mode"), concurrent=True)
    assert set(res["runs"]) == {"inference", "dszo"}
    assert "no_such_mode" in res["failed"] and "invalid choice" in res["failed"]["no_such_mode"]
    assert res["ratio_dszo_over_inference"]["median"] > 0
    assert all(r["peak_rss"] >= r["rss_after_build"] > 0 for rs in res["runs"].values() for r in rs)
    with pytest.raises(RuntimeError, match="no_such_mode"):
        bench_memory("tiny", 2, 8, 1, modes=("no_such_mode",), concurrent=False)


def test_sampler_benchmark_smoke():
    """benchmarks.sampler_bench on the tiny shape: the three draws and the four steps are timed, ratios reported."""
    from test_native import _has_avx2_fma, needs_native
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    from benchmarks.sampler_bench import draws, steps
    d = draws(1)
    assert set(d) == {"torch normal_", "native, ATen sampler", "native, vectorised"}
    assert all(v["median"] > 0 for v in d.values())
    s = steps("tiny", 2, 8, 1)
    assert set(s["wall"]) == {"dszo, ATen sampler", "dszo, vectorised", "dszo, fused passes", "mezo"}
    assert s["vectorised / ATen"]["median"] > 0 and s["fused / vectorised"]["median"] > 0
    from ds_zo import native
    assert native.chunk_draws().fast_gaussian()     # left on


def test_host_path_benchmark_smoke(tmp_path):
    """benchmarks.host_path on two layers: every arm is timed with the kernels stood in (restored after)
    and the JSON is written."""
    from ds_zo import triton_z
    from ds_zo.perturb import counter_based_unavailable
    if counter_based_unavailable("cpu") is not None:
        pytest.skip("needs Triton's interpreter")
    from benchmarks import host_path
    real = triton_z.launch
    out = tmp_path / "host.json"
    r = host_path.main(["--layers", "2", "--steps", "1", "--reps", "1", "--out", str(out)])
    assert triton_z.launch is real
    assert set(r["step_s"]) == {"kept", "general", "kept_offload", "general_offload", "hf_forward"}
    assert all(v["median"] > 0 for v in r["step_s"].values()) and r["units"] == 6   # (OPT: 2 embeddings, the head)
    assert out.exists() and set(r["kept_over_general"]) == {"", "_offload"}


def test_pipeline_host_benchmark_smoke(tmp_path):
    """benchmarks.pipeline_host on CPU: the pipeline's host time per unit visit over every layer, and the pointing
    primitive (the CUDA primitives only where CUDA is)."""
    from benchmarks import pipeline_host
    out = tmp_path / "pipe.json"
    r = pipeline_host.main(["--layers", "3", "--passes", "2", "--reps", "1", "--device", "cpu", "--out", str(out)])
    v = r["pipeline_visit"]
    assert v["units"] == 3 and v["unit_params"] == 16 and 0 < v["min_us"] <= v["median_us"] <= v["max_us"]
    assert set(r["primitive_us"]) == {"point_16_params_twice"} and r["primitive_us"]["point_16_params_twice"] > 0
    assert out.exists()


def test_offload_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks.offload_bench on the tiny shape (the GPU check's benchmark, here on CPU): both modes timed, the
    same parameters at the end, and each mode's host ops profiled, the pipeline's copies visible in the offload one."""
    import json
    from benchmarks.offload_bench import main
    out = tmp_path / "ob.json"
    import benchmarks.offload_bench as ob
    written = []
    real_write = ob.write_json
    ob.write_json = lambda path, result: (written.append((len(result["runs"]), result.get("partial"),
                                                          result.get("offload_step_s_median"))),
                                          real_write(path, result))
    try:
        res = main(["--shape", "tiny", "--seq", "16", "--batch", "1,2", "--steps", "1", "--reps", "1",
                    "--out", str(out)])
    finally:
        ob.write_json = real_write
    assert json.loads(out.read_text())["params_identical"] is True and res["params_identical"] is True
    # what a cut-short GPU check keeps: the result so far after each batch size, then the whole one
    assert [w[:2] for w in written] == [(1, True), (2, True), (2, None)]
    assert written[0][2] == res["offload_step_s_median"]
    assert not os.path.exists(str(out) + ".tmp")
    assert res["offload_step_s_median"] > 0 and res["resident_step_s_median"] > 0
    ops = {m: res[f"{m}_host_ops"] for m in ("resident", "offload")}
    assert all("top" in o and o["top"] and o["ops"] > 0 for o in ops.values()), ops
    copies = {m: o["counts"].get("aten::copy_", 0) for m, o in ops.items()}
    assert ops["offload"]["ops"] > ops["resident"]["ops"] and copies["offload"] > copies["resident"], copies


def test_offload_benchmark_modes():
    """The GPU check's comparisons: offload engines per prefetch depth, engines with zero_order.row_blocks "off"
    (whole copies); an unknown mode is refused by name."""
    from benchmarks.offload_bench import main, mode_names
    assert mode_names(["resident", "offload", "resident_whole_copies", "offload_whole_copies"], [1, 2]) == {
        "resident": None, "offload": 1, "offload_p2": 2, "resident_whole_copies": None, "offload_whole_copies": 1}
    with pytest.raises(SystemExit, match="unknown \\['fast'\\]"):
        mode_names(["resident", "fast"], [1])
    res = main(["--shape", "tiny", "--seq", "8", "--batch", "1", "--steps", "1", "--reps", "1", "--no-profile",
                "--modes", "resident,offload,offload_whole_copies"])
    assert res["offload_whole_copies_step_s_median"] > 0 and res["params_identical"] is True
    # on CPU whole copies and row blocks give the same parameters (on these shapes)
    assert res["whole_copies_params_identical"] is True and res["whole_copies_max_param_diff"] == 0.0


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """One offload_bench --calibrate run on CPU (2 repetitions, host calibration shapes tiny and small), its result
    and the folder its JSON is in."""
    from benchmarks.offload_bench import main
    folder = tmp_path_factory.mktemp("gpu_check")
    res = main(["--shape", "tiny", "--seq", "8", "--batch", "1", "--steps", "1", "--reps", "2", "--calibrate",
                "--no-profile", "--host-shapes", "tiny,small", "--out", str(folder / "opt-tiny.json")])
    return res, folder


def test_offload_benchmark_samples_the_host_between_repetitions(calibrated_run):
    """--calibrate: the host's issue rates and the host calibration steps (two shapes, each mode) are measured before
    every repetition (the GPU machines' host speed drifts); the model's host costs are fitted per mode to the
    calibration steps' medians, and per repetition to its own sample for a paired error; the micro-measured host
    costs predict beside them. The pipeline diagnosis (upload stalls, the pipeline's host time) is reported per
    batch, and --no-profile skips the profiled steps."""
    import statistics
    res, _ = calibrated_run
    cal = res["model"]
    samples = cal["host_rate_samples"]
    steps = cal["host_steps"]
    assert len(samples) == 2 and len(steps["samples"]) == 2 and steps["shapes"] == ["tiny", "small"]
    assert set(steps["samples"][0]) == {"tiny/resident", "tiny/offload", "small/resident", "small/offload"}
    assert steps["median"]["small/offload"] == statistics.median(s["small/offload"] for s in steps["samples"])
    assert cal["micro"]["host_pass_s"] == statistics.median(s["host_pass_s"] for s in samples)
    assert {c["mode"] for c in cal["cases"]} == {"resident", "offload"}
    for c in cal["cases"]:
        # host costs fitted for the case's mode (that they reproduce the steps: test_host_fit_reproduces_...)
        fit = c["host_fit"]
        assert fit["unit_host_s"] >= 0 and fit["host_chunk_s"] >= 0
        assert c["predicted_micro_s"] > 0 and c["error_micro"] == c["predicted_micro_s"] / c["measured_s"] - 1
        # each repetition is also predicted from the host sample taken just before it
        assert len(c["error_per_rep"]) == 2 and c["error_paired"] == statistics.median(c["error_per_rep"])
    assert cal["abs_error_paired"]["max"] == max(abs(c["error_paired"]) for c in cal["cases"])
    assert cal["abs_error_micro"]["max"] == max(abs(c["error_micro"]) for c in cal["cases"])
    run = res["runs"][0]
    assert run["offload_upload_stall_s"] is not None and run["offload_pipeline_host_s"] > 0
    assert len(run["offload_step_s_reps"]) == 2 and not any(k.endswith("_host_ops") for k in res)


def test_gpu_summary_reads_the_gpu_checks_results(calibrated_run, tmp_path):
    """benchmarks.gpu_summary: one offload_bench --calibrate result (here a CPU run) and a GPU memory section give
    the throughput ratios, each case's errors (fitted and micro host costs) and the memory ratios; an empty folder
    says so."""
    import json
    import shutil
    from benchmarks.gpu_summary import main, summary
    shutil.copy(calibrated_run[1] / "opt-tiny.json", tmp_path / "opt-tiny.json")
    mb = {"median": 2.5e8}
    (tmp_path / "smollm2_gpu_memory.json").write_text(json.dumps({"gpu_memory": [{
        "shape": "smollm2-135m", "rows": 4, "seq": 64, "device": "cuda", "measure": "peak_gpu",
        "peak_gpu": {"inference": mb, "dszo": {"median": 3e8}}, "ratio_dszo_over_inference": {"median": 1.2},
        "failed": {"mezo": "out of memory"}}]}))
    text = "\n".join(summary(str(tmp_path)))
    assert "batch 1: offload / resident" in text and "model batch 1 resident" in text and "partial" not in text
    assert "micro host costs" in text and "fitted host" in text and "|error| as predicted" in text
    assert "inference 250, dszo 300" in text and "dszo_over_inference 1.200" in text and "failed: mezo" in text
    # the stored calibration predicted again by today's model: the same cases
    again = "\n".join(summary(str(tmp_path), repredict=True))
    assert "opt-tiny.json (re-predicted)" in again and again.count("model batch") == text.count("model batch")
    cut = json.loads((tmp_path / "opt-tiny.json").read_text()) | {"partial": True}
    (tmp_path / "opt-tiny.json").write_text(json.dumps(cut))
    assert summary(str(tmp_path))[0].startswith("opt-tiny.json: tiny") and "(partial:" in summary(str(tmp_path))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="usage"):
        main([])
    main([str(empty)])


def test_the_model_takes_the_copy_rates_measured_with_both_directions_busy():
    """device_calibrate.predict on a GPU record (OPT-6.7B, H200, nineteenth session): where the memcpy baseline holds
    each direction's rate beside the other (offload_bench.memcpy_baseline), the offload pipeline is modelled at
    those rates, not at each direction's alone; all-resident steps move no bytes and do not change."""
    import copy
    import json
    import os
    from benchmarks.device_calibrate import predict
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "gpu_h200_2026-11-27h", "opt-6.7b.json")
    with open(path) as f:
        record = json.load(f)
    alone = {(c["batch"], c["mode"]): c for c in predict(record)["cases"]}
    duplex = copy.deepcopy(record)
    duplex["memcpy"].update(h2d_duplex_GBps=50.0, d2h_duplex_GBps=45.0)
    both = {(c["batch"], c["mode"]): c for c in predict(duplex)["cases"]}
    assert alone.keys() == both.keys() and len(both) == 4
    layer_bytes = record["h2d_bytes_per_step"]
    for key, c in both.items():
        if key[1] == "resident":
            assert c["predicted_s"] == alone[key]["predicted_s"]
        else:
            assert c["busy"]["h2d"] == pytest.approx(layer_bytes / 50e9, rel=1e-6)
            assert c["busy"]["d2h"] == pytest.approx(layer_bytes / 45e9, rel=1e-6)
            assert alone[key]["busy"]["h2d"] == pytest.approx(layer_bytes / (record["memcpy"]["h2d_GBps"] * 1e9),
                                                              rel=1e-6)
    assert both[(1, "offload")]["predicted_s"] > alone[(1, "offload")]["predicted_s"] * 1.1   # bound by the copies


def test_the_calibrations_host_steps_run_at_the_span_they_are_fitted_with(monkeypatch):
    """fit_host models the host-calibration steps at pm_span chunks per pass; the engines must run at it, not at the
    span the engine picks for the shape (a GPU's wide shape would get 1 chunk from the model-size cap, and its
    per-chunk host cost would come out 4.5x too high: found in review)."""
    import benchmarks.device_calibrate as dc
    monkeypatch.setattr(dc, "pm_span", lambda device: 8)
    host = dc.HostSteps(torch.device("cpu"), ["tiny"], ["resident"])
    assert [e.perturbations.accelerator_span_chunks for e in host.engines.values()] == [8]


def test_host_fit_reproduces_the_calibration_steps():
    """fit_host finds the per-unit and per-chunk host costs with which the model gives both calibration steps: steps
    made by the model itself from known costs give those costs back (GPU-like overlap, resident and offload)."""
    from ds_zo import perfmodel as pm
    rates = {"rng_rate": 3e11, "elem_bw": 3e12, "merge_bw": 1.5e12, "host_pass_s": 8e-6, "host_chunk_s": 1e-5}
    steps = {"shapes": ["tiny", "wide"], "forward_flops": {"tiny": 1e9, "wide": 5e10}}
    for mode, layout in (("resident", pm.Layout("resident")), ("offload", pm.Layout("zo2", 1, 1, 1))):
        truth = {"unit_host_s": 1.5e-3, "host_chunk_s": 3e-5}
        times = {}
        for shape in steps["shapes"]:
            hw = dc_hardware(rates | {"host_chunk_s": truth["host_chunk_s"]}, steps["forward_flops"][shape],
                             truth["unit_host_s"])
            times[f"{shape}/{mode}"] = pm.simulate(pm.shape(shape, 8), hw, layout, pm.Workload(1, 8)).step_s
        from benchmarks.device_calibrate import fit_host
        fit = fit_host(rates, steps, times, mode, "cuda", 5e10, 5e10, 1)
        assert fit == {k: pytest.approx(v, rel=1e-3) for k, v in truth.items()}, (mode, fit)


def dc_hardware(rates: dict, flops: float, unit_host_s: float):
    from benchmarks.device_calibrate import hardware, pm_span
    return hardware(rates, flops, 5e10, 5e10, 4, unit_host_s, "cuda", pm_span("cuda"))


def test_median_calibration_of_launches():
    """The model's rates are the element-wise median over the launches' calibrations; the 2-rank launches measure
    no per-unit overhead (their ZO steps would be collective), which passes through as None."""
    from benchmarks.run import _median_calibration

    def cal(x, overhead=True):
        return {"micro": {"rng_rate": x, "elem_bw": 10 * x}, "forward": {"4": {"flops": 100 * x}},
                "overhead": {"unit_host_s": x / 1000} if overhead else None}
    med = _median_calibration([cal(1.0), cal(3.0), cal(2.0)])
    assert med == {"micro": {"rng_rate": 2.0, "elem_bw": 20.0}, "forward": {"4": {"flops": 200.0}},
                   "overhead": {"unit_host_s": 0.002}}
    assert _median_calibration([cal(1.0, False), cal(5.0, False)])["overhead"] is None


def test_the_gpu_check_script_runs_its_sections_in_order_under_its_budget(tmp_path):
    """benchmarks/gpu_check.sh parses and, with no budget left, skips every section in order of need (each says how
    long it needs) and still runs the summary: the device call's minutes go to the sections that fit."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET_S="0", PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [line.split(":")[0].removeprefix("--- ") for line in proc.stdout.splitlines() if "skipped" in line]
    assert skipped == ["CUDA tests", "OPT-1.3B", "OPT-6.7B", "pipeline host", "SmolLM2 GPU memory",
                       "SmolLM2 whole copies"]
    assert f"no GPU check results in {tmp_path}" in proc.stdout
