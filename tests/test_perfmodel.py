"""ds_zo.perfmodel: the event loop and the per-unit pipeline in cases whose answer is known in closed form."""
import pytest

from ds_zo import perfmodel as pm

INF = float("inf")


def toy(layers=6, params=1_000_000, flops_per_token=1e6, head=False):
    """Equal decoder layers (offloaded), optionally a resident head; no embedding."""
    units = [pm.UnitSpec(f"layers.{i}", params, params, flops_per_token, 8, True) for i in range(layers)]
    if head:
        units.append(pm.UnitSpec("lm_head", params, params, flops_per_token, 8, False))
    return pm.ModelSpec("toy", tuple(units), 8)


def hw(**kw):
    """Everything infinitely fast unless given: each test turns on only the costs it reasons about."""
    base = dict(name="toy", flops=INF, rng_rate=INF, elem_bw=INF, h2d_bw=INF, d2h_bw=INF, link_bw=INF, host_bw=INF,
                gpus_per_node=8, overlap=True, host_chunk_s=0.0, unit_host_s=0.0, collective_latency_s=0.0,
                dtype_bytes=4)
    base.update(kw)
    return pm.Hardware(**base)


WORK = pm.Workload(rows=2, seq=5)     # 10 tokens; 2 slots per unit => 20 token-forwards per unit


# -- the event loop ---------------------------------------------------------------------------------------------------

def test_simulator_fifo_and_dependencies():
    sim = pm.Simulator()
    a = sim.add("a", "x", 2.0)
    b = sim.add("b", "y", 1.0, [a])          # waits for a on another resource
    c = sim.add("c", "x", 1.0)               # FIFO behind a on x
    d = sim.add("d", "y", 0.5)               # FIFO behind b on y, even though it is ready at t=0
    assert sim.run() == pytest.approx(3.5)
    ops = sim.ops
    assert (ops[b].start, ops[c].start, ops[d].start) == (2.0, 2.0, 3.0)
    assert sim.busy() == {"x": 3.0, "y": 1.5}


def test_simulator_zero_length_chain_and_deadlock():
    sim = pm.Simulator()
    a = sim.add("a", "x", 0.0)
    b = sim.add("b", "y", 0.0, [a])
    sim.add("c", "x", 1.0, [b])
    assert sim.run() == 1.0
    sim = pm.Simulator()
    later = 1
    sim.add("waits for a later op on its own queue", "x", 1.0, [later])
    sim.add("later", "x", 1.0)
    with pytest.raises(pm.DeadlockError):
        sim.run()


# -- the pipeline -----------------------------------------------------------------------------------------------------

def test_compute_bound_step_is_the_compute_sum():
    model = toy(head=True)
    h = hw(flops=1e9, h2d_bw=1e15, d2h_bw=1e15)           # transfers negligible (1e-11 s per unit)
    r = pm.simulate(model, h, pm.Layout("zo2"), WORK)
    compute = sum(2 * WORK.tokens * u.flops_per_token for u in model.units) / 1e9
    assert r.step_s == pytest.approx(compute, rel=1e-6)
    assert r.bottleneck == "compute"


def test_transfer_bound_step_is_the_upload_sum():
    model = toy(layers=6, params=1000)
    h = hw(h2d_bw=4000.0, d2h_bw=8000.0)                  # 1 s per upload, 0.5 s per offload, compute free
    r = pm.simulate(model, h, pm.Layout("zo2"), WORK)
    assert r.step_s == pytest.approx(6.0)
    assert r.busy["h2d"] == pytest.approx(6.0) and r.busy["d2h"] == pytest.approx(3.0)
    assert r.bottleneck == "h2d"
    assert r.bytes_per_step["h2d"] == r.bytes_per_step["d2h"] == 6 * 1000 * 4


def test_overlap_is_bounded_by_max_and_sum_and_no_overlap_is_the_sum():
    model = toy(layers=8, params=1000)
    kw = dict(flops=2 * WORK.tokens * 1e6 / 1.0, h2d_bw=4000 / 0.8, d2h_bw=4000 / 0.6)   # c=1, up=0.8, off=0.6
    over = pm.simulate(model, hw(**kw), pm.Layout("zo2"), WORK)
    serial = pm.simulate(model, hw(overlap=False, **kw), pm.Layout("zo2"), WORK)
    assert serial.step_s == pytest.approx(8 * (1.0 + 0.8 + 0.6))
    assert max(8 * 1.0, 8 * 0.8, 8 * 0.6) <= over.step_s + 1e-9
    assert over.step_s < serial.step_s
    assert over.step_s == pytest.approx(8 * 1.0 + 0.8)     # only the first upload of the step is exposed


@pytest.mark.parametrize("depth,expected", [(0, 2 * 6), (1, 6 + 1), (2, 6 + 1)])
def test_prefetch_depth(depth, expected):
    """Upload = compute = offload = 1 s per unit: depth 0 serialises upload and compute (2L), depth >= 1 hides all
    uploads but the step's first (L + 1)."""
    model = toy(layers=6, params=1000)
    h = hw(flops=2 * WORK.tokens * 1e6, h2d_bw=4000.0, d2h_bw=4000.0)
    r = pm.simulate(model, h, pm.Layout("zo2", prefetch_depth=depth), WORK)
    assert r.step_s == pytest.approx(expected)


def test_pass_boundary_buffer_reuse():
    """Buffers are assigned by position in the pass (ds_zo's pipeline): when the previous pass's last unit used buffer
    0, the next pass's first upload waits for that unit's offload, exposing one more transfer per step."""
    model = toy(layers=6, params=1000)
    h = hw(flops=2 * WORK.tokens * 1e6, h2d_bw=4000.0, d2h_bw=4000.0)
    r = pm.simulate(model, h, pm.Layout("zo2", prefetch_depth=3), WORK)   # 5 buffers: unit 5 used buffer 0
    assert r.step_s == pytest.approx(6 + 2)


def test_reslicing_divides_pcie_time_by_n_and_gathers_the_rest():
    model = toy(layers=4, params=1200)
    h = hw(h2d_bw=1000.0, d2h_bw=1000.0, link_bw=1e6)
    naive = pm.simulate(model, h, pm.Layout("naive", 4), pm.Workload(8, 5))
    resliced = pm.simulate(model, h, pm.Layout("reslice", 4), pm.Workload(8, 5))
    assert resliced.busy["h2d"] == pytest.approx(naive.busy["h2d"] / 4)
    assert resliced.busy["d2h"] == pytest.approx(naive.busy["d2h"] / 4)
    assert resliced.bytes_per_step["h2d"] == naive.bytes_per_step["h2d"] / 4
    assert resliced.bytes_per_step["allgather"] == 3 * naive.bytes_per_step["h2d"] / 4
    assert resliced.step_s < naive.step_s / 3


def test_shared_host_memory_caps_naive_but_not_zo2():
    model = toy(layers=6, params=1000)
    h = hw(h2d_bw=4000.0, d2h_bw=4000.0, host_bw=16000.0, gpus_per_node=8)   # 16000 / (2 dirs x 8 GPUs) = 1000
    one = pm.simulate(model, h, pm.Layout("zo2"), pm.Workload(8, 5))
    eight = pm.simulate(model, h, pm.Layout("naive", 8), pm.Workload(8, 5))
    assert one.step_s == pytest.approx(6 * 1.0)                 # own link: 1 s per unit
    assert eight.step_s == pytest.approx(6 * 4.0)               # a quarter of the link: 4 s per unit


def test_data_parallel_splits_rows_and_pertp_splits_slots():
    model = toy(layers=2, head=True)
    h = hw(flops=1e9)
    one = pm.simulate(model, h, pm.Layout("resident"), pm.Workload(4, 5))
    ddp = pm.simulate(model, h, pm.Layout("resident", 2), pm.Workload(4, 5))
    pertp = pm.simulate(model, h, pm.Layout("resident", 2, pertp=2), pm.Workload(4, 5))
    odd = pm.simulate(model, h, pm.Layout("resident", 4), pm.Workload(3, 5))  # ceil(3/4) = 1 row on the slowest rank
    assert ddp.step_s == pytest.approx(one.step_s / 2)
    assert pertp.step_s == pytest.approx(one.step_s / 2)
    assert odd.per_rank_rows == 1 and odd.step_s == pytest.approx(one.step_s / 4)
    assert ddp.bytes_per_step["allreduce"] == 6 * 8 and one.bytes_per_step["allreduce"] == 0


def test_zo_work_is_replicated_not_divided_by_data_parallelism():
    """z draws and θ±εz are per rank, whatever the batch split: the floor of strong scaling."""
    model = toy(layers=2)
    h = hw(rng_rate=1e6)                     # only z draws cost: (perturb + update) x 1e6 elements = 2 s per unit
    one = pm.simulate(model, h, pm.Layout("resident"), WORK)
    four = pm.simulate(model, h, pm.Layout("resident", 4), pm.Workload(8, 5))
    assert one.step_s == pytest.approx(2 * 2.0) == four.step_s


def test_fused_passes_count_their_bytes_except_for_row_block_copies():
    """ds_zo's fused CPU passes: the update moves 2b bytes per element (θ read and written) and a layer's copies b
    + 2b (θ read, both signs written) instead of torch's passes over a drawn z (8 + 3b + 4 and 2 (2b + 4)); the copies
    of a row-block unit (embedding, output layer) are still formed from drawn z."""
    layer = pm.UnitSpec("layers.0", 1000, 1000, 0.0, 0, True)          # (no slot merge to count)
    head = pm.UnitSpec("lm_head", 1000, 1000, 0.0, 0, False, row_blocks=True)
    model = pm.ModelSpec("toy", (layer, head), 8)
    steps = {f: pm.simulate(model, hw(elem_bw=1.0, fused_passes=f), pm.Layout("resident"), WORK).step_s
             for f in (False, True)}
    b = 4
    update_plain, update_fused = 8 + (2 * b + 4), 2 * b
    perturb_plain, perturb_fused = 2 * (2 * b + 4), b + 2 * b
    assert steps[False] == pytest.approx(2 * 1000 * (update_plain + perturb_plain))
    assert steps[True] == pytest.approx(1000 * (2 * update_fused + perturb_fused + perturb_plain))


def test_the_counter_based_sampler_costs_the_host_one_launch_per_span_piece_not_per_chunk():
    """z_sampler "philox" draws a tensor's slice in one launch: a layer of one 16-chunk tensor and 3 small ones, at a
    span of 8 chunks, costs host_chunk_s per piece (2 + 3, for the perturbation and again for the update) instead
    of per chunk (17 + 3: pm._chunks counts the 300 elements past the 16 chunks as one more)."""
    layer = pm.UnitSpec("layers.0", 16 * pm.CHUNK + 300, 16 * pm.CHUNK + 300, 0.0, 0, True, tensors=4)
    model = pm.ModelSpec("toy", (layer,), 8)
    steps = {c: pm.simulate(model, hw(host_chunk_s=1e-3, span_chunks=8, counter_z=c), pm.Layout("resident"),
                            WORK).step_s for c in (False, True)}
    assert steps[False] == pytest.approx(2 * (17 + 3) * 1e-3)      # 16 chunks and a piece, as pm._chunks counts
    assert steps[True] == pytest.approx(2 * (3 + 3) * 1e-3)        # 2 spans and a piece, 3 small tensors


def test_each_zo_kernel_costs_the_device_its_floor():
    """kernel_floor_s: the device's own time per ZO kernel, whatever its size. With only it costing, a resident step
    is floor × (z draws + element-wise passes). The layer (one 16-chunk tensor and 3 small ones, a span of 8
    chunks) is drawn in 6 pieces per draw (pm._chunks: 3 span pieces of its 16 M + 300 elements, 3 more tensors),
    once to perturb and once to update, and each piece takes the passes that form both signs and apply the update."""
    layer = pm.UnitSpec("layers.0", 16 * pm.CHUNK + 300, 16 * pm.CHUNK + 300, 0.0, 0, True, tensors=4)
    model = pm.ModelSpec("toy", (layer,), 8)
    h = hw(kernel_floor_s=1e-3, span_chunks=8, counter_z=True)
    pieces = 3 + 3                                      # ceil(n / span) + tensors - 1
    draws = 2 * pieces                                  # the perturbation's and the update's
    passes = pm.perturb_passes(2) * pieces + pm.update_passes(1) * pieces
    assert pm.simulate(model, h, pm.Layout("resident"), WORK).step_s == pytest.approx((draws + passes) * 1e-3)
    assert pm.simulate(model, hw(span_chunks=8, counter_z=True), pm.Layout("resident"), WORK).step_s == 0.0


def test_fused_kernels_cost_one_launch_per_unit_pass_and_read_theta_once():
    """ds_zo's fused Triton kernels: a layer's visit is q launches for θ±εz and one for the update whatever its
    tensors and size, each costing the host a launch and its table's copy, the device its floor; a row-block unit's
    copies still take the unfused passes (its update fuses). Device bytes: the update 2b, the copies b + 2b."""
    layer = pm.UnitSpec("layers.0", 16 * pm.CHUNK + 300, 16 * pm.CHUNK + 300, 0.0, 0, True, tensors=4)
    head = pm.UnitSpec("lm_head", 1000, 1000, 0.0, 0, False, row_blocks=True)
    h = dict(span_chunks=8, counter_z=True, fused=True)
    host = pm.simulate(pm.ModelSpec("toy", (layer,), 8), hw(host_chunk_s=1e-3, host_pass_s=1e-4, **h),
                       pm.Layout("resident"), WORK).step_s
    assert host == pytest.approx(2 * (1e-3 + 1e-4))          # one θ±εz launch, one update launch
    floor = pm.simulate(pm.ModelSpec("toy", (layer, head), 8), hw(kernel_floor_s=1e-3, **h), pm.Layout("resident"),
                        WORK).step_s
    # the head: one draw and the two signs' passes for its copies (one piece), one fused update
    assert floor == pytest.approx((2 + 1 + pm.perturb_passes(2) + 1) * 1e-3)
    n = 16 * pm.CHUNK + 300
    bw = pm.simulate(pm.ModelSpec("toy", (layer,), 8), hw(elem_bw=1e9, **h), pm.Layout("resident"), WORK).step_s
    assert bw == pytest.approx(n * (2 * 4 + 4 + 2 * 4) / 1e9)     # b = 4: update 2b, copies b + 2b
    rng = pm.simulate(pm.ModelSpec("toy", (layer,), 8), hw(rng_rate=1e9, fused_rng_rate=4e9, **h),
                      pm.Layout("resident"), WORK).step_s
    assert rng == pytest.approx(2 * n / 4e9)
    # more perturbations than the update kernel sums: the copies stay fused (q launches), the update does not
    q = pm.FUSED_MAX_Q + 1
    many = pm.simulate(pm.ModelSpec("toy", (layer,), 8), hw(host_chunk_s=1e-3, host_pass_s=1e-4, **h),
                       pm.Layout("resident"), pm.Workload(WORK.rows, WORK.seq, q)).step_s
    pieces = 3 + 3                                      # span pieces of the layer's 4 tensors (as above)
    assert many == pytest.approx(q * (1e-3 + 1e-4) + q * pieces * 1e-3 + pm.update_passes(q) * pieces * 1e-4)


def test_first_step_has_no_offload_and_steady_state_needs_two_steps():
    model = toy(layers=3, params=1000)
    h = hw(h2d_bw=1e9, d2h_bw=4000.0, overlap=False)
    r = pm.simulate(model, h, pm.Layout("zo2"), WORK)
    assert r.first_step_s == pytest.approx(3 * 4e-6)           # uploads only
    assert r.step_s == pytest.approx(3 * 4e-6 + 3 * 1.0)       # + one offload per unit
    with pytest.raises(ValueError):
        pm.simulate(model, h, pm.Layout("zo2"), WORK, steps=1)


def test_layout_validation():
    with pytest.raises(ValueError):
        pm.Layout("zo2", 2)
    with pytest.raises(ValueError):
        pm.Layout("reslice", 3, pertp=2)
    with pytest.raises(ValueError):
        pm.Layout("sideways")
    assert pm.Layout("reslice", 16).k(pm.H100) == 8 and pm.Layout("reslice", 4).k(pm.H100) == 4


def test_shapes_and_constants_agree_with_ds_zo():
    from ds_zo.perturb import CHUNK_ELEMENTS
    assert pm.CHUNK == CHUNK_ELEMENTS
    opt = pm.shape("opt-175b", 2048)
    assert 174e9 < opt.params < 176e9                          # OPT-175B
    assert opt.layer_params() * 2 / 1e9 == pytest.approx(348, rel=0.01)   # ≈ 350 GB in 16-bit (DESIGN.md §6)
    smol = pm.shape("smollm2-135m", 64)
    assert smol.params == 134_515_008                          # SmolLM2-135M, tied embedding counted once
    # the loss's tiling is ds_zo.loss's on accelerators: OPT's 50272 columns at 2 x 2048 positions are 28 tiles
    from ds_zo.loss import DEVICE_TILE_ELEMENTS, DEVICE_VOCAB_WINDOW, loss_tiling
    assert (pm.H100.loss_window, pm.H100.loss_tile_elements) == (DEVICE_VOCAB_WINDOW, DEVICE_TILE_ELEMENTS)
    window, group = loss_tiling("cuda", 50272)
    assert 2 * pm.loss_tiles(2048, 50272, pm.H100.loss_window, pm.H100.loss_tile_elements) == 28 \
        == 2 * -(-2048 // group) * -(-50272 // window)
    assert (opt.vocab, smol.vocab) == (50272, 49152)


def test_the_loss_tiles_cost_host_time_after_the_last_unit():
    """The loss's ops are issued by the host after the output layer's: with only host_pass_s costing, the step is
    the tiles' ops (slots x tiles x LOSS_OPS_PER_TILE x host_pass_s); a model with no vocabulary has none."""
    units = (pm.UnitSpec("lm_head", 0, 0, 0.0, 0, False),)
    model = pm.ModelSpec("head", units, 8, vocab=20000)
    h = hw(host_pass_s=1e-3, loss_window=8192, loss_tile_elements=1 << 14)     # tiles of 2 positions x 8192
    r = pm.simulate(model, h, pm.Layout("resident"), WORK)                     # 10 positions, 2 slots
    tiles = 2 * 5 * 3
    assert pm.loss_tiles(10, 20000, 8192, 1 << 14) == 15
    assert r.step_s == pytest.approx(tiles * pm.LOSS_OPS_PER_TILE * 1e-3)
    assert pm.simulate(pm.ModelSpec("head", units, 8), h, pm.Layout("resident"), WORK).step_s == 0.0


def test_opt175b_zo2_on_one_h100_is_pcie_bound_when_zo_kernels_are_fused():
    """DESIGN.md §6: 350 GB each way over 55 GB/s ⇒ ZO2 is PCIe-bound at ≥ 6.4 s/step, once the fused kernels draw z
    at 5e11 values/s (at the 2.27e11 measured inside the fused kernels, the compute stream is just above PCIe). The
    preset takes 51 GB/s each way (both directions at once, as measured in the offload pipeline): PCIe-bound there
    too, at its bytes over that rate."""
    for rate, low, high in ((55e9, 6.3, 6.6), (pm.H100.h2d_bw, 6.8, 7.1)):
        r = pm.simulate(pm.shape("opt-175b", 256),
                        pm.with_(pm.H100, fused_rng_rate=5e11, h2d_bw=rate, d2h_bw=rate), pm.Layout("zo2"),
                        pm.Workload(16, 256))
        assert r.bottleneck == "h2d"
        assert low <= r.step_s <= high
        assert r.bytes_per_step["h2d"] / rate == pytest.approx(r.step_s, rel=0.03)
