"""A discrete-event performance model of ds_zo's ZO step: one rank's per-unit pipeline, streams as resources.

What is simulated (per rank, several consecutive steps, steady state reported):

    host ─ issue unit k (Python, z-chunk seeding)            ┐ per step: the ops below for every unit in model order,
    h2d  ─ upload unit k (or its 1/k shard)                  │ then the loss sync (+ the scalar all-reduce) on the
    comm ─ shard update → all-gather → reassemble (reslice)  │ host, after which the next step starts
    compute ─ pending update → perturb (z, θ±εz) → forward   │
    d2h  ─ offload unit k (or its shard)                     ┘

Each resource is a FIFO server, as a CUDA stream is: its ops run one at a time in issue order, each when all its
dependencies (events) have finished. The dependencies are the ones ds_zo's pipeline records: an upload needs a free
device buffer (a pool of depth + 2, round robin by position in the pass) and the unit's previous offload (the store is
not read while being written), and may run at most `prefetch_depth` units ahead of compute (depth 0: only after the
previous unit computed); compute needs the upload (and, resliced, the all-gather); the offload needs the compute.
With `Hardware.overlap = False` every op runs on one resource, in issue order: a CPU "device" without streams, or
CUDA with overlap off. The event loop itself (`Simulator`) knows nothing of ZO.

Costs per op come from the model shape (units with parameter counts and forward FLOPs per token), the tokens a rank
computes, and the hardware rates: forward FLOPs / `flops`; z draws / `rng_rate`; element-wise passes (bytes counted
from ds_zo's own kernels, below) / `elem_bw`; host↔device bytes / the per-GPU PCIe rate, capped by the node's host
memory bandwidth shared by every GPU that moves data at once; all-gathers ((k−1)·shard bytes received per rank) /
`link_bw` (NVLink) plus a latency; on the host, `host_chunk_s` per 2^20-element z chunk (seeding + launch, issued by
Python) and `host_pass_s` per element-wise op, issued once per piece of `span_chunks` chunks (ds_zo.perturb's span),
and after the last unit the token loss's ops at `host_pass_s` each (LOSS_OPS_PER_TILE per tile of positions ×
vocabulary window; ds_zo.loss).

Layouts (`Layout.kind`): "resident" (everything on the device; ZO-DDP / PertP without offload), "zo2" (one GPU,
decoder layers stream over PCIe), "naive" (DistZO2 without reslicing: every GPU moves whole units over its own
link), "reslice" (each GPU uploads 1/k of a unit, all-gathers over NVLink, offloads only its shard; k = the GPUs of
a node, replicated across nodes). `pertp` = 2 runs one sign per rank (perturbation parallelism); data parallel degree
dp = gpus / pertp, each rank computing ceil(rows / dp) rows (strong scaling: the global batch is fixed).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

CHUNK = 1 << 20          # ds_zo.perturb.CHUNK_ELEMENTS (kept in sync by a test)

# ---------------------------------------------------------------------------------------------------------------------
# the event loop


@dataclass
class Op:
    name: str
    resource: str
    duration: float
    deps: tuple[int, ...]
    start: Optional[float] = None
    end: Optional[float] = None


class DeadlockError(RuntimeError):
    pass


class Simulator:
    """Resources are FIFO servers; an op starts when it heads its resource's queue, the resource is idle, and every
    op it depends on has ended. `run()` returns the time the last op ends."""

    def __init__(self):
        self.ops: list[Op] = []
        self.queues: dict[str, list[int]] = {}

    def add(self, name: str, resource: str, duration: float, deps: Sequence[Optional[int]] = ()) -> int:
        if duration < 0 or math.isnan(duration):
            raise ValueError(f"op {name}: duration {duration}")
        i = len(self.ops)
        self.ops.append(Op(name, resource, float(duration), tuple(d for d in deps if d is not None)))
        self.queues.setdefault(resource, []).append(i)
        return i

    def run(self) -> float:
        now = 0.0
        head = dict.fromkeys(self.queues, 0)
        busy = dict.fromkeys(self.queues, False)
        running: list[tuple[float, int]] = []     # (end, op) of the ops in progress
        finished = 0
        while finished < len(self.ops):
            progress = True
            while progress:           # zero-length ops may end at `now` and unlock others at the same instant
                progress = False
                while running and running[0][0] <= now:
                    end, i = heapq.heappop(running)
                    self.ops[i].end = end
                    busy[self.ops[i].resource] = False
                    finished += 1
                    progress = True
                for res, q in self.queues.items():
                    if busy[res] or head[res] == len(q):
                        continue
                    op = self.ops[q[head[res]]]
                    if all(self.ops[d].end is not None for d in op.deps):
                        op.start = now
                        heapq.heappush(running, (now + op.duration, q[head[res]]))
                        head[res] += 1
                        busy[res] = True
                        progress = True
            if finished == len(self.ops):
                break
            if not running:
                stuck = [self.ops[q[head[r]]].name for r, q in self.queues.items() if head[r] < len(q)]
                raise DeadlockError(f"no op can start at t={now}: waiting at the head of a queue: {stuck}")
            now = running[0][0]
        return max((op.end for op in self.ops), default=0.0)

    def busy(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for op in self.ops:
            out[op.resource] = out.get(op.resource, 0.0) + op.duration
        return out


# ---------------------------------------------------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class UnitSpec:
    name: str
    params: int              # elements perturbed when the unit runs (a tied weight counts in both of its units)
    owned: int               # elements the unit stores and updates (0 for the head tied to the embedding)
    flops_per_token: float   # forward FLOPs of one slot per token
    out_width: int           # output features per token the slots concatenate (0: written into one output)
    is_layer: bool           # a decoder layer: offloaded by default
    tensors: int = 1         # parameter tensors (z is drawn per tensor, in chunks of 2^20 elements)
    row_blocks: bool = False  # an embedding or output layer: its copies are formed a block of rows at a time


@dataclass(frozen=True)
class ModelSpec:
    name: str
    units: tuple[UnitSpec, ...]
    hidden: int
    vocab: int = 0           # the token loss's columns (0: no loss modelled)

    @property
    def params(self) -> int:
        return sum(u.owned for u in self.units)

    def layer_params(self) -> int:
        return sum(u.owned for u in self.units if u.is_layer)


def decoder(name: str, family: str, hidden: int, layers: int, ffn: int, vocab: int, seq: int, heads: int = 1,
            kv_heads: Optional[int] = None, tied: bool = True, max_positions: int = 2048) -> ModelSpec:
    """The units ds_zo cuts a Llama- or OPT-style decoder into, with parameter counts and FLOPs per token at `seq`."""
    h = hidden
    attn = 2 * seq * h            # QKᵀ and AV per token, causal (half of the full 4·seq·h)
    if family == "llama":
        kv = h * (kv_heads or heads) // heads
        layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h           # q, o, k, v, gate/up/down, two RMSNorms
        matmul = 2 * h * h + 2 * h * kv + 3 * h * ffn
        embed = [UnitSpec("embed_tokens", vocab * h, vocab * h, 0.0, h, False, row_blocks=True)]
        final = [UnitSpec("norm", h, h, 0.0, h, False)]
        tensors = 9
    elif family == "opt":
        layer = 4 * (h * h + h) + 2 * h * ffn + ffn + h + 4 * h          # attention with biases, fc1/fc2, 2 LayerNorms
        matmul = 4 * h * h + 2 * h * ffn
        embed = [UnitSpec("embed_tokens", vocab * h, vocab * h, 0.0, h, False, row_blocks=True),
                 UnitSpec("embed_positions", (max_positions + 2) * h, (max_positions + 2) * h, 0.0, h, False,
                          row_blocks=True)]
        final = [UnitSpec("final_layer_norm", 2 * h, 2 * h, 0.0, h, False, 2)]
        tensors = 16
    else:
        raise ValueError(f"family {family!r}")
    units = embed + [UnitSpec(f"layers.{i}", layer, layer, 2.0 * matmul + attn, h, True, tensors)
                     for i in range(layers)]
    # the output layer writes every slot's logits into one tensor (model/streamed.py): nothing to concatenate
    units += final + [UnitSpec("lm_head", vocab * h, 0 if tied else vocab * h, 2.0 * vocab * h, 0, False,
                               row_blocks=True)]
    return ModelSpec(name, tuple(units), h, vocab)


SHAPES = {   # name: (family, hidden, layers, ffn, vocab, heads, kv_heads, tied)
    "tiny": ("llama", 64, 4, 128, 256, 4, 1, True),
    "small": ("llama", 256, 8, 768, 8192, 4, 1, True),
    "smollm2-135m": ("llama", 576, 30, 1536, 49152, 9, 3, True),
    "opt-1.3b": ("opt", 2048, 24, 8192, 50272, 32, 32, True),
    "wide": ("llama", 2048, 2, 8192, 1024, 8, 2, True),      # benchmarks' host calibration on GPUs
    "opt-6.7b": ("opt", 4096, 32, 16384, 50272, 32, 32, True),
    "opt-175b": ("opt", 12288, 96, 49152, 50272, 96, 96, True),
}


def shape(name: str, seq: int) -> ModelSpec:
    family, h, layers, ffn, vocab, heads, kv, tied = SHAPES[name]
    return decoder(name, family, h, layers, ffn, vocab, seq, heads, kv, tied)


# ---------------------------------------------------------------------------------------------------------------------
# hardware, layout, workload


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float                  # achieved forward FLOP/s on the model's matmuls
    rng_rate: float               # z elements drawn per second (float32 normal)
    elem_bw: float                # device memory bandwidth seen by element-wise passes, bytes/s
    h2d_bw: float                 # host→device bytes/s of one GPU's link (pinned)
    d2h_bw: float                 # device→host bytes/s
    link_bw: float = float("inf")     # GPU↔GPU all-gather bytes received per second per GPU (NVLink, one direction)
    host_bw: float = float("inf")     # a node's host memory bandwidth shared by all its GPUs' DMA (both directions)
    gpus_per_node: int = 8
    overlap: bool = True              # separate streams for h2d / d2h / comm / compute / host
    host_chunk_s: float = 0.0         # host time per z chunk (key mixing, generator seeding, kernel launch)
    host_pass_s: float = 0.0          # host time per element-wise op (θ±εz, the update), one per piece of a span
    span_chunks: int = 1              # z chunks per element-wise pass (ds_zo.perturb span: ACCELERATOR_SPAN_CHUNKS)
    unit_host_s: float = 0.0          # host time per unit visit (wrappers, HF module code)
    # the token loss (ds_zo.loss), reduced a tile of positions × vocabulary window at a time, each tile about
    # LOSS_OPS_PER_TILE small ops issued by the host at host_pass_s (its device time is in `flops`, which is
    # measured on forwards that compute HF's loss); the accelerators' tiling by default
    loss_window: int = 8192
    loss_tile_elements: int = 1 << 23                 # 1 << 21 until the tenth session
    collective_latency_s: float = 0.0     # per all-gather / all-reduce call
    dtype_bytes: int = 2              # bytes per stored and computed element (2: bf16/fp16, 4: fp32)
    merge_bw: Optional[float] = None  # bytes/s written by the slot concatenation (torch.cat into a new tensor);
                                      # None: elem_bw / 2 (a read and a write)
    fused_passes: bool = False        # θ±εz and the update each in one sweep that draws z as it goes (never
                                      # written): b bytes read + b per output, z at rng_rate. ds_zo's CPU passes
                                      # (native/z_passes.h), except row-block units' copies
    fused: bool = False               # ds_zo's fused Triton kernels (triton_passes, with counter_z): per unit visit
                                      # θ±εz in one launch per perturbation (row-block units: the unfused passes)
                                      # and the update in one, z drawn in registers at fused_rng_rate, θ read once
                                      # and each output written once; a launch costs the host host_chunk_s plus
                                      # host_pass_s (its segment table's copy)
    fused_rng_rate: Optional[float] = None    # z values/s drawn inside those kernels (None: rng_rate)
    host_fused_s: Optional[float] = None      # host time per fused launch (None: host_chunk_s + host_pass_s)
    kernel_floor_s: float = 0.0       # device time of one ZO kernel beyond its bytes (launch, ramp, tail), charged per
                                      # z draw and element-wise pass on the compute stream: most of a step's ZO
                                      # kernels are small (a bias's, a norm's) with the counter-based sampler
    counter_z: bool = False           # z drawn by ds_zo's counter-based sampler (zero_order.z_sampler "philox"): one
                                      # launch per tensor slice of a pass, so host_chunk_s is charged per launch (a
                                      # span's piece of a tensor), not per 2^20-element chunk


# H100 SXM. Measured on this project's H200 machine (benchmarks/results/gpu_h200_2026-11-26c, the same GH100 chip
# and host software): pinned PCIe ≈ 55 GB/s each way; a model forward at ≈ 600 TFLOP/s of its analytic FLOPs (OPT
# 1.3B/6.7B, 550–645); ds_zo's counter-based z sampler (zero_order.z_sampler, the GPUs' default since the sixteenth
# session) ≈ 3.11e11 values/s timed queued in fills of a span of 8 2^20-element chunks, and 25 µs of host time per
# launch (a span's piece of one tensor) (gpu_h200_2026-11-27d/e); 8 µs per element-wise op, 1.7 ms per unit visit;
# ds_zo's span of 8 chunks. Assumed: HBM3 ≈ 3.0 TB/s achieved by element-wise kernels (the H200 reached 4.1 of its
# 4.8 TB/s); NVLink 4 ≈ 450 GB/s per direction; a DGX-H100-class node with 2 sockets × 8 DDR5-4800 channels (614 GB/s
# peak), of which ≈ 450 GB/s is taken to be available to the GPUs' DMA in both directions together; 20 µs per
# collective.
# Since the seventeenth session θ±εz and the update are fused with the z draw (triton_passes): one launch per unit
# and pass. Timed on the H200 in the nineteenth session (gpu_h200_2026-11-27f, device_calibrate): z drawn inside
# the fused kernels at 2.27e11 values/s (queued), 90 µs of host time per launch from a kept layout (the keys, the
# table and its copy, the launch), 1.9 µs of device time per small ZO kernel; the fitted per-unit host time with
# the fused kernels 1.67–1.83 ms. PCIe: 55 GB/s is each direction alone; the offload pipeline runs both at once,
# and its uploads ran at 50–52 GB/s in transfer-bound steps (…27f, …27h): 51 GB/s each way is taken.
H100 = Hardware("H100-SXM (8 per node)", flops=600e12, rng_rate=3.11e11, elem_bw=3.0e12, h2d_bw=51e9, d2h_bw=51e9,
                link_bw=450e9, host_bw=450e9, gpus_per_node=8, overlap=True, host_chunk_s=25e-6, host_pass_s=8e-6,
                span_chunks=8, unit_host_s=1.75e-3, collective_latency_s=20e-6, dtype_bytes=2, counter_z=True,
                fused=True, fused_rng_rate=2.27e11, host_fused_s=90e-6, kernel_floor_s=1.9e-6)
# the counter-based sampler with the element-wise passes as torch ops over drawn z (the sixteenth session's build)
H100_UNFUSED = replace(H100, fused=False)
# the same with the chunked sampler (the GPUs' until the sixteenth session): torch's normal_ at ≈ 1.77e11 values/s
# (gpu_h200_2026-11-26j: 1.76e11 and 1.78e11; 1.81e11 on …27e), one seeded launch per 2^20-element chunk at 22 µs
# of host time (blake2b key, Generator.manual_seed, the launch; 157 µs per span of 8 on …27e)
H100_CHUNKED_Z = replace(H100_UNFUSED, rng_rate=1.77e11, host_chunk_s=22e-6, counter_z=False)


@dataclass(frozen=True)
class Layout:
    kind: str = "zo2"             # "resident" | "zo2" | "naive" | "reslice"
    gpus: int = 1
    pertp: int = 1
    prefetch_depth: int = 1
    partition: Optional[int] = None   # reslicing group size k (default: the GPUs of one node)

    def __post_init__(self):
        if self.kind not in ("resident", "zo2", "naive", "reslice"):
            raise ValueError(f"layout kind {self.kind!r}")
        if self.pertp not in (1, 2) or self.gpus % self.pertp:
            raise ValueError(f"pertp {self.pertp} with {self.gpus} GPUs")
        if self.kind == "zo2" and self.gpus != 1:
            raise ValueError("zo2 is the one-GPU layout; use naive or reslice for several")
        if self.prefetch_depth < 0:
            raise ValueError("prefetch_depth >= 0")

    @property
    def dp(self) -> int:
        return self.gpus // self.pertp

    @property
    def offload(self) -> bool:
        return self.kind != "resident"

    def k(self, hw: Hardware) -> int:
        if self.kind != "reslice":
            return 1
        return self.partition or min(self.gpus, hw.gpus_per_node)


@dataclass(frozen=True)
class Workload:
    rows: int                     # global batch rows per step
    seq: int
    q: int = 1                    # perturbations per step

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


# element-wise traffic of ds_zo's kernels, bytes per element (b = bytes of the stored/computed dtype); z is drawn
# already scaled (ε, |g|: the sampler's own pass, counted at rng_rate); a 16-bit θ widens inside the kernels (computed
# in fp32, rounded once on the store):
#   perturb (model/perturbed_copies.py): per sign torch.add/sub(θ, εz, out) r b + r4 + w b
#   update (optimizer.apply_step): u.mul_(lr) 8, torch.sub(θ, u, out=θ) r b r4 w b; per further perturbation
#     u.add_(z) 12 and once u.div_(q) 8
FUSED_MAX_Q = 8      # perturbations the fused update kernel sums (triton_passes.MAX_Q); beyond, the unfused update


def perturb_passes(signs: int) -> int:
    """Element-wise ops issued per piece by the perturbation: per sign torch.add/sub into the copy."""
    return signs


def update_passes(q: int = 1) -> int:
    """Element-wise ops issued per piece by the update: u.mul_(lr), θ −= u, per further perturbation u.add_(z)
    and once u.div_(q)."""
    return 2 + (q - 1) + (1 if q > 1 else 0)


def perturb_bytes(b: int, signs: int, fused: bool = False) -> float:
    if fused:
        return b + signs * b
    return signs * (2 * b + 4)


def update_bytes(b: int, q: int = 1, fused: bool = False) -> float:
    if fused:
        return 2 * b
    return 8 + (2 * b + 4) + 12 * (q - 1) + (8 if q > 1 else 0)


# ---------------------------------------------------------------------------------------------------------------------
# one rank's program


@dataclass
class Result:
    step_s: float                 # steady-state step time (end of the last step minus end of the one before)
    first_step_s: float           # the first step (no pending update: nothing to offload)
    busy: dict[str, float]        # seconds each resource is busy per steady step
    bottleneck: str
    bytes_per_step: dict[str, float]    # this rank, steady state: h2d, d2h, allgather (received), allreduce
    tokens_per_s: float           # global tokens per second
    layout: Layout
    per_rank_rows: int


# ops per loss tile (TokenCrossEntropy.add): the float32 copy, amax, log_softmax, its amax, two widenings, the
# difference, the running log-sum-exp (logaddexp and its store)
LOSS_OPS_PER_TILE = 9


def loss_tiles(positions: int, vocab: int, window: int, tile_elements: int) -> int:
    """Tiles one slot's loss is reduced in: position groups × vocabulary windows (ds_zo.loss.loss_tiling)."""
    if positions <= 0 or vocab <= 0:
        return 0
    window = max(1, min(vocab, window))
    group = max(1, tile_elements // window)
    return math.ceil(positions / group) * math.ceil(vocab / window)


def _update_only(u: UnitSpec) -> UnitSpec:
    """u with nothing to perturb: its update's launches alone (a resliced shard is updated on another stream)."""
    return replace(u, params=0)


def _chunks(n: float, tensors: int = 1, size: int = CHUNK) -> int:
    """Pieces of `size` (default: z chunks) for n elements spread over `tensors` tensors (each starts a new piece)."""
    return int(math.ceil(n / size)) + tensors - 1 if n > 0 else 0


def simulate(model: ModelSpec, hw: Hardware, layout: Layout, work: Workload, steps: int = 3,
             offloaded: Optional[Sequence[str]] = None) -> Result:
    """Simulate `steps` consecutive ZO steps of one rank (ranks are symmetric) and return the steady state."""
    if steps < 2:
        raise ValueError("steps >= 2 (the first step has no pending update)")
    b = hw.dtype_bytes
    dp, k = layout.dp, layout.k(hw)
    rows = math.ceil(work.rows / dp)
    tokens = rows * work.seq
    slots = 2 * work.q // layout.pertp                  # slots this rank computes per unit visit
    signs = 2 // layout.pertp                           # signs per perturbation on this rank
    off_names = set(offloaded) if offloaded is not None else {u.name for u in model.units if u.is_layer}
    units = list(model.units)
    is_off = [layout.offload and u.name in off_names for u in units]
    # per-GPU host link rate: the node's host memory is shared by every GPU moving data at once (both directions)
    movers = min(layout.gpus, hw.gpus_per_node) if layout.offload else 1
    h2d_bw = min(hw.h2d_bw, hw.host_bw / (2 * movers))
    d2h_bw = min(hw.d2h_bw, hw.host_bw / (2 * movers))

    def res(name: str) -> str:
        return name if hw.overlap else "device"

    fused_rate = hw.fused_rng_rate or hw.rng_rate

    def t_update(n: float) -> float:
        fused = hw.fused and work.q <= FUSED_MAX_Q
        return (n * work.q / (fused_rate if fused else hw.rng_rate)
                + n * update_bytes(b, work.q, fused or hw.fused_passes) / hw.elem_bw)

    def t_perturb(u: UnitSpec) -> float:
        fused = (hw.fused or hw.fused_passes) and not u.row_blocks
        return (u.params * work.q / (fused_rate if hw.fused and fused else hw.rng_rate)
                + u.params * work.q * perturb_bytes(b, signs, fused) / hw.elem_bw)

    def t_forward(u: UnitSpec) -> float:
        t = slots * tokens * u.flops_per_token / hw.flops
        if slots > 1:                                   # merge: the slots' outputs are concatenated
            t += slots * tokens * u.out_width * b / (hw.merge_bw or hw.elem_bw / 2)
        return t

    def zo_launches(u: UnitSpec, update_elems: float) -> tuple[int, int, int]:
        """(z draws, element-wise passes, fused kernels) that a visit of u issues, perturbations counted: each one
        kernel launch."""
        span = CHUNK * hw.span_chunks
        draw_size = span if hw.counter_z else CHUNK
        perturb_fused = hw.fused and not u.row_blocks
        update_fused = hw.fused and work.q <= FUSED_MAX_Q
        fused = (work.q if perturb_fused and u.params > 0 else 0) + (1 if update_fused and update_elems > 0 else 0)
        draws = passes = 0
        if not perturb_fused:
            draws += work.q * _chunks(u.params, u.tensors, draw_size)
            passes += work.q * perturb_passes(signs) * _chunks(u.params, u.tensors, span)
        if not update_fused:
            draws += work.q * _chunks(update_elems, u.tensors, draw_size)
            passes += update_passes(work.q) * _chunks(update_elems, u.tensors, span)
        return draws, passes, fused

    def t_host(u: UnitSpec, update_elems: float) -> float:
        draws, passes, fused = zo_launches(u, update_elems)
        per_fused = hw.host_fused_s if hw.host_fused_s is not None else hw.host_chunk_s + hw.host_pass_s
        return hw.unit_host_s + hw.host_chunk_s * draws + hw.host_pass_s * passes + per_fused * fused

    def t_floor(u: UnitSpec, update_elems: float) -> float:
        """The device's own time per ZO kernel beyond its bytes (launch, ramp, tail): what many small kernels cost."""
        return hw.kernel_floor_s * sum(zo_launches(u, update_elems))

    sim = Simulator()
    depth = layout.prefetch_depth
    off_idx = [i for i, o in enumerate(is_off) if o]
    nbuf = max(1, min(depth + 2, len(off_idx)))
    shard = [math.ceil(units[i].owned / k) for i in range(len(units))]
    unit_bytes = [(shard[i] if layout.kind == "reslice" else units[i].owned) * b for i in range(len(units))]
    prev_free: dict[int, int] = {}        # buffer -> op that frees it (the previous pass)
    prev_offload: dict[int, int] = {}     # unit -> its last offload op
    step_end: list[int] = []
    sync = None
    # the step's sums, counts, rows and data check; reslicing adds the partition group's agreement on its forwards
    bytes_step = {"h2d": 0.0, "d2h": 0.0, "allgather": 0.0,
                  "allreduce": (8.0 * (4 * work.q + 2) if layout.gpus > 1 else 0.0)
                  + (8.0 * k if layout.kind == "reslice" and k > 1 else 0.0)}
    for s in range(steps):
        pending = s > 0
        compute_of: dict[int, int] = {}   # position in the offloaded pass -> compute op
        free_of: dict[int, int] = {}
        ready_of: dict[int, int] = {}
        last_compute = None

        def issue_upload(p: int) -> None:
            i = off_idx[p]
            buf = p % nbuf
            deps = [sync, compute_of.get(p - depth - 1), prev_offload.get(i)]
            deps.append(free_of[p - nbuf] if p >= nbuf else prev_free.get(buf))
            up = sim.add(f"s{s} up {units[i].name}", res("h2d"), unit_bytes[i] / h2d_bw, deps)
            if s == steps - 1:
                bytes_step["h2d"] += unit_bytes[i]
            ready = up
            if layout.kind == "reslice":
                n_shard = shard[i]
                if pending:
                    ready = sim.add(f"s{s} shard-update {units[i].name}", res("comm"),
                                    t_update(n_shard) + t_floor(_update_only(units[i]), n_shard), [ready])
                gathered = (k - 1) * n_shard * b
                t_ag = (gathered / hw.link_bw + hw.collective_latency_s if k > 1 else 0.0)
                t_ag += 2 * units[i].owned * b / hw.elem_bw            # reassemble the full unit, trimming padding
                ready = sim.add(f"s{s} all-gather {units[i].name}", res("comm"), t_ag, [ready])
                if s == steps - 1:
                    bytes_step["allgather"] += gathered
            ready_of[p] = ready

        for p in range(min(depth + 1, len(off_idx))):
            issue_upload(p)
        for i, u in enumerate(units):
            resliced = is_off[i] and layout.kind == "reslice"
            upd = u.owned if (pending and not resliced) else 0
            host = sim.add(f"s{s} issue {u.name}", res("host"),
                           t_host(u, upd if not resliced else (shard[i] if pending else 0)), [sync])
            dur = (t_update(upd) if upd else 0.0) + t_perturb(u) + t_forward(u) + t_floor(u, upd)
            if is_off[i]:
                p = off_idx.index(i)
                if p not in ready_of:
                    issue_upload(p)
                c = sim.add(f"s{s} compute {u.name}", res("compute"), dur, [host, ready_of[p]])
                compute_of[p] = c
                if pending:
                    o = sim.add(f"s{s} offload {u.name}", res("d2h"), unit_bytes[i] / d2h_bw, [c])
                    prev_offload[i] = o
                    free_of[p] = o
                    if s == steps - 1:
                        bytes_step["d2h"] += unit_bytes[i]
                else:
                    free_of[p] = c
                nxt = p + depth + 1
                if nxt < len(off_idx) and nxt not in ready_of:
                    issue_upload(nxt)
            else:
                c = sim.add(f"s{s} compute {u.name}", res("compute"), dur, [host])
            last_compute = c
        # the loss: its tiles' ops issued after the output layer's, their device time inside the forward's
        tiles = slots * loss_tiles(tokens, model.vocab, hw.loss_window, hw.loss_tile_elements)
        loss = sim.add(f"s{s} issue loss", res("host"), tiles * LOSS_OPS_PER_TILE * hw.host_pass_s, [sync])
        allreduce = hw.collective_latency_s if layout.gpus > 1 else 0.0
        sync = sim.add(f"s{s} loss sync", res("host"), allreduce, [last_compute, loss])
        step_end.append(sync)
        for p, op in free_of.items():
            prev_free[p % nbuf] = op
    sim.run()
    ends = [sim.ops[i].end for i in step_end]
    step_s = ends[-1] - ends[-2]
    first = ends[0]
    busy: dict[str, float] = {}
    for op in sim.ops:
        if op.name.startswith(f"s{steps - 1} "):
            busy[op.resource] = busy.get(op.resource, 0.0) + op.duration
    bottleneck = max(busy, key=busy.get) if busy else "none"
    return Result(step_s, first, busy, bottleneck, bytes_step, work.tokens / step_s if step_s > 0 else float("inf"),
                  layout, rows)


# ---------------------------------------------------------------------------------------------------------------------
# scaling studies


def scaling(model: ModelSpec, hw: Hardware, work: Workload, gpus: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8, 16),
            kinds: Sequence[tuple[str, int]] = (("naive", 1), ("reslice", 1), ("reslice", 2))) -> dict:
    """Speedup over ZO2 on one GPU at the same global batch (so the same training trajectory), per layout
    (kind, pertp) and GPU count. At one GPU every curve is ZO2 itself. Beyond one node, GPU counts should be whole
    nodes (reslicing groups are the GPUs of a node, replicated across nodes)."""
    base = simulate(model, hw, Layout("zo2", 1), work)
    out = {"zo2_step_s": base.step_s, "zo2_bottleneck": base.bottleneck, "zo2_busy": base.busy, "curves": {}}
    for kind, pertp in kinds:
        name = kind + (f"+pertp{pertp}" if pertp > 1 else "")
        curve = []
        for n in gpus:
            if n % pertp:
                continue
            r = simulate(model, hw, Layout(kind, n, pertp) if n > 1 else Layout("zo2"), work)
            curve.append({"gpus": n, "step_s": r.step_s, "speedup": base.step_s / r.step_s,
                          "bottleneck": r.bottleneck, "busy": r.busy, "rows_per_rank": r.per_rank_rows})
        out["curves"][name] = curve
    return out


def saturation(curve: list[dict], fraction: float = 0.9) -> Optional[int]:
    """The smallest GPU count reaching `fraction` of the curve's best speedup (where adding GPUs stops paying)."""
    if not curve:
        return None
    best = max(c["speedup"] for c in curve)
    return next(c["gpus"] for c in curve if c["speedup"] >= fraction * best)


def with_(hw: Hardware, **changes) -> Hardware:
    return replace(hw, **changes)


__all__ = ["Simulator", "DeadlockError", "UnitSpec", "ModelSpec", "decoder", "shape", "SHAPES", "Hardware", "H100",
           "H100_UNFUSED", "H100_CHUNKED_Z",
           "Layout", "Workload", "Result", "simulate", "scaling", "saturation", "with_", "perturb_bytes",
           "update_bytes", "CHUNK"]
