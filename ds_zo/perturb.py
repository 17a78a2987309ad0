"""Slice-addressable perturbations z (DESIGN.md invariant 5).

z for one (step seed, perturbation index, parameter) is defined over the parameter flattened in row-major order, chunk
by chunk: chunk k covers elements [k*C, min((k+1)*C, n)) and is drawn, whole, from a generator seeded with a key mixed
from (step seed, perturbation index, parameter key, k). Any slice [a, b) is therefore produced by drawing only the
chunks it overlaps, and every rank, partitioning and offload layout sees the same values bit for bit on one device
type. A chunk is always drawn at its full length because torch's CPU normal sampler fills blocks of 16 values and is
not prefix-stable: drawing a shorter length can change earlier values.

Nothing here depends on global RNG state or on call order. On GPUs z comes by default from a second, counter-based
definition (ds_zo/triton_z.py: Philox at each element's index, any slice in one launch); `zero_order.z_sampler`
chooses, and `z_stream` names the stream a run draws.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch

from . import native

CHUNK_ELEMENTS = 1 << 20  # large enough that kernel launches stay rare on a GPU, small enough for cheap partial slices
DISTRIBUTIONS = ("gaussian", "rademacher")
# "chunked": one seeded torch sampler call per 2^20-element chunk (every device; the only one on CPU by default);
# "philox": the counter-based Triton kernel, one launch per slice (ds_zo/triton_z.py); "auto": philox on CUDA where
# Triton is installed and a trial launch succeeds (_trial_launch), chunked elsewhere
SAMPLERS = ("auto", "philox", "chunked")
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1
# CPU: torch's normal sampler is serial, but chunks have their own seeds, so up to this many are drawn at once on
# separate threads (each with its own generator); callers size their scratch by `span()` elements
MAX_PARALLEL_CHUNKS = 4
# Accelerators draw a chunk per kernel, but every element-wise pass over it costs a launch and Python on the host:
# callers work on this many chunks per pass there (one chunk per pass left an H200 idle 80 % of an OPT-1.3B step)
ACCELERATOR_SPAN_CHUNKS = 8
# an accelerator span covers at most this share (1/64) of the model's elements (accelerator_span_chunks)
SPAN_MODEL_SHARE = 64
# the smallest chunk whose scaled draw is exactly fl(z * scale): torch's CPU sampler transforms blocks of 16 in float32
# (z * std + 0, one rounding); shorter tensors are sampled in float64 and z * std rounded once from there, which is
# not the float32 product of the float32 z
_FOLDED_MIN = 16
# Rademacher draws ±scale as b * (2 scale) - scale: 2 scale must stay finite in float32
_RADEMACHER_MAX_SCALE = 1.7e38
_FOLD_LIMIT = {"gaussian": float("inf"), "rademacher": _RADEMACHER_MAX_SCALE}   # scales a draw folds below
# (device, dtype) whose fused-kernel self-check failure has been warned about
_WARNED_FUSED: set = set()


def _key63(data: bytes) -> int:
    """A stable 63-bit key of some bytes (blake2b: no Python hash randomisation, no collisions in practice)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def mix(*values: int) -> int:
    """A stable 63-bit key from a tuple of integers (blake2b: no Python hash randomisation, no collisions in practice)."""
    return _key63(struct.pack(f"<{len(values)}Q", *[v & _MASK64 for v in values]))


_FOUR = struct.Struct("<4Q")


def chunk_key(seed: int, index: int, key: int, chunk: int) -> int:
    """mix(seed, index, key, chunk), the seed of one z chunk, without mix's generic packing: it runs once per drawn
    chunk, on the host's critical path when a GPU draws."""
    return _key63(_FOUR.pack(seed & _MASK64, index & _MASK64, key & _MASK64, chunk & _MASK64))


_THREE = struct.Struct("<3Q")


@functools.lru_cache(maxsize=1 << 14)
def slice_key(seed: int, index: int, key: int) -> int:
    """mix(seed, index, key), the key of a counter-based z stream, without mix's generic packing: it runs once per
    launch, on the host's critical path when a GPU draws. Kept (a pure function): the update of step t + 1 needs the
    keys that step t's perturbations made, one per parameter and perturbation (2 µs of blake2b each, 0.3 kept); the
    cache holds two steps of them for 8,192 parameters at q = 1."""
    return _key63(_THREE.pack(seed & _MASK64, index & _MASK64, key & _MASK64))


def accelerator_span_chunks(layer_elements: Optional[int], chunk: int, model_elements: Optional[int] = None) -> int:
    """Chunks per element-wise pass on accelerators for a model whose largest decoder layer has `layer_elements`
    parameters (None: no layer list found) and which has `model_elements` in all (None: not known):
    ACCELERATOR_SPAN_CHUNKS, but not more chunks than such a layer covers, nor than 1/SPAN_MODEL_SHARE of the model.
    A span sizes the float32 scratch of every pass and the row blocks of an embedding or output layer (one block
    per slot, and the block's logits). A layer is the scale of the model's own per-unit memory (its weights, its
    working copies): a span beyond it only adds to the peak and saves no launch a layer's passes need. The model's
    size bounds what the span adds to the peak, which is the output layer's: about 8 bytes per span element in bf16
    (4 of float32 scratch, 2 × 2 of row blocks), so at most 1/16 of a bf16 model's bytes at 1/SPAN_MODEL_SHARE. On an
    H200 SmolLM2-135M (3.5 M-element layers, 134.5 M in all) peaked at 371 MB with 4 chunks and 405 MB with 8 (a
    logits-only forward: 328 MB): 8.4 MB per chunk, all of it at the output layer; 2 chunks leave about 354 MB.
    Models of 1 B parameters and more keep the 8 chunks, so OPT's GPU timings are those of the full span."""
    cap = ACCELERATOR_SPAN_CHUNKS
    if layer_elements is not None:
        cap = min(cap, -(-layer_elements // chunk))
    if model_elements is not None:
        cap = min(cap, model_elements // (SPAN_MODEL_SHARE * chunk))
    return max(1, cap)


def stream_key(device: torch.device) -> tuple:
    """(device, its current CUDA stream) — or (device, None) off CUDA: the key of scratch buffers that two streams
    must not share (a resliced shard is updated on the all-gather's stream while the compute stream updates too)."""
    return device, (torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)


def span_groups(items: Sequence, sizes: Sequence[int], span: int) -> list[list]:
    """Consecutive items in groups of at most `span` elements in all (an item larger than `span` stands alone): the
    batches of whole z chunks that one `fill_many` call draws together."""
    groups, cur, size = [], [], 0
    for item, n in zip(items, sizes):
        if cur and size + n > span:
            groups.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += n
    return groups + [cur] if cur else groups


def z_stream(device: torch.device | str, counter_based: bool = False) -> str:
    """What z depends on besides (seed, index, key, chunk): the device's sampler. Chunked: on CPU torch's mt19937
    normal_ ("cpu"); on CUDA torch's Philox normal_, which strides a tensor's elements over a launch grid of
    multiProcessorCount × (maxThreadsPerMultiProcessor / 256) blocks (aten/src/ATen/native/cuda/
    DistributionTemplates.h), so GPUs with a different SM count — an A100 and an H100, a MIG slice — draw different z
    from the same seed ("cuda/132x2048"). Counter-based (triton_z): integer Philox, then the device's own log, sin and
    cos: named by the compute capability and a digest of values drawn here ("cuda-philox/9.0/1a2b3c4d";
    "cpu-philox/<digest>" in Triton's interpreter), so that two hosts whose values differ on a fixed sample never
    pass for one stream. Every rank of a run must draw the same z, and a replay must run on the same stream."""
    device = torch.device(device)
    if counter_based:
        digest, why = _trial_launch(device.type)
        if why:
            raise ValueError(f"the counter-based z sampler cannot run on {device.type}: {why}")
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return f"cuda-philox/{props.major}.{props.minor}/{digest}"
        return f"{device.type}-philox/{digest}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda/{props.multi_processor_count}x{getattr(props, 'max_threads_per_multi_processor', 0)}"
    return device.type


def parse_z_stream(stream: str) -> tuple[str, str]:
    """(device type, sampler: "philox" or "chunked") of a z_stream name."""
    kind = stream.split("/")[0]
    return (kind.removesuffix("-philox"), "philox") if kind.endswith("-philox") else (kind, "chunked")


def counter_based_unavailable(device: torch.device | str) -> Optional[str]:
    """Why the counter-based sampler cannot draw on `device` (None: it can)."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        return f"it runs on CUDA devices, not {kind}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (CUDA builds of torch bring it; pip install triton)"
    try:
        from . import triton_z
    except Exception as err:           # a broken Triton install: say so, the chunked sampler still works
        return f"importing Triton failed ({type(err).__name__}: {err})"
    if kind == "cpu" and not triton_z.INTERPRETED:
        return "on CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1, for tests)"
    if kind == "cuda" and triton_z.INTERPRETED:
        return ("Triton's interpreter is on (TRITON_INTERPRET): it would compute z on the host with numpy, another "
                "stream than the compiled kernel's; unset it on GPUs")
    return _trial_launch(kind)[1]


@functools.lru_cache(maxsize=None)
def _trial_launch(kind: str) -> tuple[Optional[str], Optional[str]]:
    """(digest of the stream here, None) or (None, why the kernel cannot run here). The launch compiles the kernel (or
    reads it from Triton's cache): a broken install or a missing host compiler shows here, before any z is drawn."""
    try:
        from . import triton_z
        return triton_z.stream_digest(kind), None
    except Exception as err:
        return None, f"Triton cannot run its kernel here ({type(err).__name__}: {err})"


def param_key(name: str) -> int:
    """The key of a parameter: its canonical (first) name in the model, stable across processes and layouts."""
    return _key63(name.encode())


def step_seed(run_seed: int, step: int) -> int:
    """The seed of one optimizer step; the step log stores it, so replay never needs the run seed."""
    return mix(0x5EED, run_seed, step)


def _check_request(out: torch.Tensor, start: int, numel: int) -> None:
    if out.dtype != torch.float32 or out.dim() != 1:
        raise ValueError("z buffers are flat float32 tensors")
    if start < 0 or start + out.numel() > numel:
        raise ValueError(f"slice [{start}, {start + out.numel()}) is outside a parameter of {numel} elements")


class PerturbationGenerator:
    """Draws z (always float32) for any slice of any parameter."""

    def __init__(self, distribution: str = "gaussian", chunk_elements: int = CHUNK_ELEMENTS, sampler: str = "auto"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"zero_order.distribution: {distribution!r} is not one of {DISTRIBUTIONS}")
        if sampler not in SAMPLERS:
            raise ValueError(f"zero_order.z_sampler: {sampler!r} is not one of {SAMPLERS}")
        if chunk_elements < 16:
            raise ValueError(f"chunk_elements must be >= 16, got {chunk_elements}")
        self.distribution = distribution
        self.sampler = sampler
        self._counter_based: dict[str, bool] = {}     # device type -> whether z comes from triton_z there
        self._fused_why: dict[tuple, Optional[str]] = {}     # fused_kernels_unavailable's answers
        self.chunk = chunk_elements
        self.accelerator_span_chunks = ACCELERATOR_SPAN_CHUNKS
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}    # (device, CUDA stream) -> a chunk of float32
        self._spans: dict[tuple, tuple[torch.Tensor, ...]] = {}    # (device, CUDA stream) -> spans of float32
        self._local = threading.local()       # per worker thread: its own CPU generator
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_size, self._pool_pid = 0, 0
        self.elements_drawn = 0  # instrumentation: how many z values were generated (benchmarks report it)
        # CPU: form θ ± εz and apply the update in one native sweep each, z drawn a tile at a time (same values);
        # off: the element-wise passes run as torch ops over drawn z chunks (benchmarks and tests compare the two)
        self.fused_passes = True

    def __getstate__(self) -> dict:
        # the worker pool and the per-thread generators belong to this process: a copy makes its own
        state = dict(self.__dict__)
        state.update(_local=None, _pool=None, _pool_size=0, _pool_pid=0, _generators={}, _scratch={}, _spans={},
                     _counter_based={}, _fused_why={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_fused_why", {})       # (a state from before the fused kernels)
        self._local = threading.local()

    def set_sampler(self, sampler: str) -> None:
        """Draw with `sampler` from now on (SAMPLERS); where it draws is decided again at the next draw."""
        if sampler not in SAMPLERS:
            raise ValueError(f"zero_order.z_sampler: {sampler!r} is not one of {SAMPLERS}")
        self.sampler, self._counter_based, self._fused_why = sampler, {}, {}

    def counter_based(self, device: torch.device | str) -> bool:
        """Whether z on this device comes from the counter-based kernel (triton_z) rather than chunk by chunk: with
        z_sampler "philox" (an error naming why where it cannot run), or "auto" on CUDA where Triton is installed."""
        kind = torch.device(device).type
        got = self._counter_based.get(kind)
        if got is None:
            if self.sampler == "chunked" or (self.sampler == "auto" and kind != "cuda"):
                got = False
            else:
                why = counter_based_unavailable(kind)
                if why and self.sampler == "philox":
                    raise ValueError(f"zero_order.z_sampler 'philox' cannot draw on {kind}: {why}; use 'chunked' "
                                     "(or 'auto')")
                got = why is None
            self._counter_based[kind] = got
        return got

    def parallel_chunks(self, device: torch.device) -> int:
        """How many whole chunks one `fill` draws at once on this device: the intra-op thread count on CPU (capped),
        1 on accelerators (whose samplers are parallel already)."""
        if torch.device(device).type != "cpu":
            return 1
        return max(1, min(torch.get_num_threads(), MAX_PARALLEL_CHUNKS))

    def span(self, device: torch.device) -> int:
        """Elements per `fill_many` call and per element-wise pass of its callers, a whole number of chunks. On CPU
        the chunks drawn at once (one per drawing thread); on accelerators `accelerator_span_chunks`
        (ACCELERATOR_SPAN_CHUNKS), so that each pass's launch and host cost is shared by that many chunks."""
        if torch.device(device).type == "cpu":
            return self.chunk * self.parallel_chunks(device)
        return self.chunk * self.accelerator_span_chunks

    def pass_elements(self, device: torch.device) -> int:
        """Elements per element-wise pass of the callers (θ±εz, the update), a whole number of chunks: one chunk on
        CPU, where a pass costs no launch and a chunk's operands stay in cache (passes over a two-chunk span measured
        3-5 % slower there); a whole span on accelerators, where every pass costs a launch and its host work."""
        return self.chunk if torch.device(device).type == "cpu" else self.span(device)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def _folds(self, out: torch.Tensor, scale: float) -> bool:
        """Whether the sampler can apply `scale` itself, giving exactly fl(z * scale) (what `z.mul_(scale)` gives),
        without a separate pass over the chunk."""
        return out.numel() >= _FOLDED_MIN and self._scale_folds(scale)

    def _scale_folds(self, scale: float) -> bool:
        return 0.0 < scale < _FOLD_LIMIT[self.distribution]

    def _draw(self, out: torch.Tensor, key: int, scale: float = 1.0, gen: Optional[torch.Generator] = None) -> None:
        """out := z * scale for the chunk of this key (scale applied as one float32 multiply)."""
        gen = gen or self._generator(out.device)
        gen.manual_seed(key)
        folds = self._folds(out, scale)
        if self.distribution == "gaussian":
            out.normal_(0.0, scale if folds else 1.0, generator=gen)
        else:   # ±scale: b·(2s) − s is exact for b in {0, 1}
            out.bernoulli_(0.5, generator=gen).mul_(2.0 * scale if folds else 2.0).sub_(scale if folds else 1.0)
        if not folds and scale != 1.0:
            out.mul_(scale)

    def _draw_native(self, jobs: list[tuple[torch.Tensor, int]], scale: float) -> list[tuple[torch.Tensor, int]]:
        """Draw the CPU chunks the native sampler can (same values, on the OpenMP team, Gaussian ones by the
        vectorised mt19937: contiguous, ≥ 16 values, scale folded); return the others (all of them where it is not
        built, or on an accelerator)."""
        if jobs[0][0].device.type != "cpu":
            return jobs
        kernels = native.chunk_draws()
        if kernels is None:
            return jobs
        mine, rest = [], []
        for job in jobs:
            (mine if self._folds(job[0], scale) and job[0].is_contiguous() else rest).append(job)
        if mine:
            kernels.draw_chunks([out for out, _ in mine], [key for _, key in mine], scale,
                                self.distribution == "gaussian")
        return rest

    def _draw_on_worker(self, job: tuple[torch.Tensor, int, float, bool]) -> None:
        gen = getattr(self._local, "gen", None)
        if gen is None:
            gen = self._local.gen = torch.Generator()
        out, key, scale, inference = job
        with torch.inference_mode(inference):   # the caller's: its buffers may be inference tensors
            self._draw(out, key, scale, gen)

    def draw_chunks(self, jobs: list[tuple[torch.Tensor, int]], scale: float = 1.0) -> None:
        """The sampler: each (out, chunk key) gets out := z * scale, the chunk's values, which depend on its key only.
        On CPU by the native sampler where it is available (several chunks at once on the intra-op threads), else on
        a pool of Python threads; on accelerators one seeded normal_ per chunk."""
        if not jobs:
            return
        self.elements_drawn += sum(out.numel() for out, _ in jobs)
        jobs = self._draw_native(jobs, scale)
        if not jobs:
            return
        threads = self.parallel_chunks(jobs[0][0].device)
        if threads > 1 and len(jobs) > 1:
            if self._pool is None or self._pool_size < threads or self._pool_pid != os.getpid():
                if self._pool is not None and self._pool_pid == os.getpid():
                    self._pool.shutdown(wait=True)
                # (a forked child has the parent's pool object but none of its threads: it makes its own)
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ds_zo-z")
                self._pool_size, self._pool_pid = threads, os.getpid()
            inference = torch.is_inference_mode_enabled()
            list(self._pool.map(self._draw_on_worker, [(out, key, scale, inference) for out, key in jobs]))
        else:
            # on an accelerator this loop is the host's critical path (every chunk is a launch): the generator is
            # looked up once
            gen = self._generator(jobs[0][0].device)
            for out, key in jobs:
                self._draw(out, key, scale, gen)

    def draw_groups(self, out: torch.Tensor, key: int, scale: float, groups: torch.Tensor) -> bool:
        """out (one whole chunk) := the groups of 16 values that `groups` marks (a uint8 per group) of the chunk of
        this key, times scale; the other values are left unset. Only the vectorised CPU sampler can skip groups:
        False, with nothing drawn, wherever whole chunks must be drawn instead (an accelerator, no native sampler,
        Rademacher z, a chunk not a multiple of 16 values, a scale the draw cannot fold)."""
        if (out.device.type != "cpu" or self.distribution != "gaussian" or out.numel() % 16
                or not self._folds(out, scale) or self.sampler == "philox"):
            return False
        kernels = native.chunk_draws()
        if kernels is None or not kernels.fast_gaussian():
            return False
        kernels.draw_groups(out, key, scale, groups)
        self.elements_drawn += 16 * int(groups.sum())
        return True

    def _fused_kernels(self, scales: Sequence[float]):
        """The native module where the fused passes can run with these scales (the vectorised Gaussian sampler on,
        each scale one the draw folds), else None."""
        if not self.fused_passes or self.distribution != "gaussian" or self.sampler == "philox":
            return None
        if not all(self._scale_folds(abs(s)) for s in scales):
            return None
        kernels = native.chunk_draws()
        return kernels if kernels is not None and kernels.fast_gaussian() else None

    def fuses(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether parameters of this device and dtype take the fused passes (benchmarks model the step by it): the
        native sweeps on CPU (float32), the Triton kernels where z is counter-based (triton_passes)."""
        try:
            counter_based = self.counter_based(device)
        except ValueError:      # "philox" where it cannot draw: nothing runs there (a draw says why)
            return False
        if counter_based:
            return self.fused_kernels_unavailable(device, dtype) is None
        return (torch.device(device).type == "cpu" and dtype == torch.float32
                and self._fused_kernels([1.0]) is not None)

    def fused_kernels_unavailable(self, device: torch.device | str, dtype: torch.dtype) -> Optional[str]:
        """Why θ ± εz and the update cannot run as the fused Triton kernels (triton_passes) on tensors of this
        device and dtype (None: they can): they need the counter-based z, and their self-check against the unfused
        path must pass on the device (once per process; a failure is warned about once and the unfused path runs).
        Asked per tensor on the host's path: the answer is kept per (device, dtype, fused_passes)."""
        key = (device, dtype, self.fused_passes)
        if key not in self._fused_why:
            self._fused_why[key] = self._fused_kernels_why(device, dtype)
        return self._fused_why[key]

    def _fused_kernels_why(self, device: torch.device | str, dtype: torch.dtype) -> Optional[str]:
        if not self.fused_passes:
            return "the fused passes are switched off"
        if not self.counter_based(device):
            return "z is not counter-based there"
        from . import triton_passes
        if dtype not in triton_passes.DTYPES:
            return f"{dtype} is not one of {list(triton_passes.DTYPES)}"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        why = triton_passes.self_check(str(device), dtype, self.distribution == "gaussian")
        if why is not None and (str(device), dtype) not in _WARNED_FUSED:
            _WARNED_FUSED.add((str(device), dtype))
            warnings.warn(f"ds_zo: {why}; θ ± εz and the update run unfused on {device} ({dtype})")
        return why

    def _triton_ready(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether these tensors (a job's master and outs, or a piece's θ) can take the fused Triton kernels: flat,
        contiguous, one dtype and device, where the kernels are available."""
        t0 = tensors[0]
        return (all(t.dim() == 1 and t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device
                    for t in tensors)
                and self.fused_kernels_unavailable(t0.device, t0.dtype) is None)

    def _perturb_triton(self, jobs: list, scale: float) -> list:
        """perturb_fused by the Triton kernel: one launch per (dtype, signs) for all the jobs that can take it."""
        from . import triton_passes
        rest, groups = [], {}
        for job in jobs:
            master, seed, index, key, numel, start, targets = job
            if not 0 <= start <= numel - master.numel():
                raise ValueError(f"slice [{start}, +{master.numel()}) is outside a parameter of {numel} elements")
            if not 1 <= len(targets) <= 2 or not self._triton_ready([master, *(out for out, _ in targets)]):
                rest.append(job)
                continue
            signs = tuple(1 if sign > 0 else -1 for _, sign in targets)
            groups.setdefault((master.device, master.dtype, signs), []).append(
                (master, start, slice_key(seed, index, key), [out for out, _ in targets]))
        for (_, _, signs), segments in groups.items():
            self.elements_drawn += triton_passes.perturb(segments, signs, scale, self.distribution == "gaussian")
        return rest

    def _update_triton(self, pieces: list, seed: int, grads: Sequence[float], lr: float, wd: float,
                       applied: Optional[Callable[[list], None]]) -> list:
        """update_fused by the Triton kernel: one launch per dtype for all the pieces that can take it."""
        from . import triton_passes
        if not 1 <= len(grads) <= triton_passes.MAX_Q:
            return pieces
        rest, groups = [], {}
        for piece in pieces:
            flat, key, start, numel, decay = piece
            if not 0 <= start <= numel - flat.numel():
                raise ValueError(f"slice [{start}, +{flat.numel()}) is outside a parameter of {numel} elements")
            if not self._triton_ready([flat]):
                rest.append(piece)
                continue
            groups.setdefault((flat.device, flat.dtype), []).append(piece)
        for group in groups.values():
            # each launch's pieces are reported as soon as it is issued: an interrupt or an error before a later
            # launch must leave them noted as updated (applying them again would be wrong)
            def launched(i: int, j: int, group=group) -> None:
                if applied is not None:
                    applied(group[i:j])
            self.elements_drawn += triton_passes.update(
                [(flat, start, [slice_key(seed, j, key) for j in range(len(grads))], decay)
                 for flat, key, start, _, decay in group], grads, lr, wd, self.distribution == "gaussian", launched)
        return rest

    def _chunk_pieces(self, flat: torch.Tensor, start: int, numel: int):
        """(view, chunk index, chunk length, offset in the chunk) for each z chunk that the flat slice
        [start, start + flat.numel()) of a parameter of `numel` elements overlaps."""
        c, lo, stop = self.chunk, start, start + flat.numel()
        while lo < stop:
            k = lo // c
            hi = min((k + 1) * c, stop)
            yield flat[lo - start:hi - start], k, min(c, numel - k * c), lo - k * c
            lo = hi

    def _fusable(self, numel: int, start: int, *tensors: torch.Tensor) -> bool:
        """Whether the slice [start, start + tensors[0].numel()) of a parameter of `numel` elements can take the
        fused passes: float32 CPU tensors, and every chunk one whose scaled draw folds (shorter ones are drawn in
        float64 and their scaled values rounded otherwise). A slice outside the parameter, or not flat, is refused
        as `fill` refuses it."""
        if tensors and (tensors[0].dim() != 1 or not 0 <= start <= numel - tensors[0].numel()):
            raise ValueError(f"slice [{start}, +{tensors[0].numel()}) of a {tensors[0].dim()}-d tensor: not a flat "
                             f"slice of a parameter of {numel} elements")
        last = (numel - 1) % self.chunk + 1 if numel else 0          # the parameter's last (shortest) chunk
        return (last >= _FOLDED_MIN
                and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors))

    def perturb_fused(self, jobs: list, scale: float) -> list:
        """Form working copies in one native sweep per z chunk where that applies (CPU, float32, Gaussian z):
        for each job (master, seed, index, key, numel, start, [(out, sign), ...]) every out := master ± scale·z over
        the flat slice [start, start + master.numel()) of z_index for the parameter `key` of `numel` elements (the
        values `fill` and torch.add / torch.sub give). Returns the jobs left for the caller's own path. Where z is
        counter-based the Triton kernel does the same on any device (triton_passes)."""
        if jobs and self.counter_based(jobs[0][0].device):
            return self._perturb_triton(jobs, scale)
        kernels = self._fused_kernels([scale])
        if kernels is None:
            return jobs
        rest, masters, keys, sizes, froms, outs, out_piece, out_add = [], [], [], [], [], [], [], []
        for job in jobs:
            master, seed, index, key, numel, start, targets = job
            if not self._fusable(numel, start, master, *(out for out, _ in targets)):
                rest.append(job)
                continue
            for view, k, n, offset in self._chunk_pieces(master, start, numel):
                at = k * self.chunk + offset - start
                for out, sign in targets:
                    outs.append(out[at:at + view.numel()])
                    out_piece.append(len(masters))
                    out_add.append(sign > 0)
                masters.append(view)
                keys.append(chunk_key(seed, index, key, k))
                sizes.append(n)
                froms.append(offset)
        if masters:
            self.elements_drawn += kernels.perturb_pieces(masters, keys, sizes, froms, scale, outs, out_piece,
                                                          out_add)
        return rest

    def update_fused(self, pieces: list, seed: int, grads: Sequence[float], lr: float, wd: float,
                     applied: Optional[Callable[[list], None]] = None) -> list:
        """Apply a ZO-SGD step in one native sweep per z chunk where that applies (CPU, float32, Gaussian z, every g
        nonzero): for each piece (flat, key, start, numel, decays) θ ← θ − lr·((1/q) Σ_j g_j·z_j + wd·θ), the values
        optimizer.apply_step_pieces gives. Returns the pieces left for that path. `applied(pieces)` is told which
        pieces the sweep updated, also when an interrupt (Ctrl-C, raised as soon as the native call returns) cuts
        this call short: an update applied twice would be wrong. Where z is counter-based the Triton kernel does the
        same on any device, with any g (triton_passes)."""
        if pieces and self.counter_based(pieces[0][0].device):
            return self._update_triton(pieces, seed, grads, lr, wd, applied)
        kernels = self._fused_kernels(grads)
        if kernels is None or not pieces or pieces[0][0].device.type != "cpu":
            return pieces
        rest, fused, thetas, keys, sizes, froms, decays = [], [], [], [], [], [], []
        for piece in pieces:
            flat, key, start, numel, decay = piece
            if not self._fusable(numel, start, flat):
                rest.append(piece)
                continue
            fused.append(piece)
            for view, k, n, offset in self._chunk_pieces(flat, start, numel):
                thetas.append(view)
                keys.extend(chunk_key(seed, j, key, k) for j in range(len(grads)))
                sizes.append(n)
                froms.append(offset)
                decays.append(decay and wd != 0.0)
        if thetas:
            done = torch.zeros(1, dtype=torch.uint8)     # set by the kernel once every piece is written
            try:
                self.elements_drawn += kernels.update_pieces(thetas, keys, sizes, froms, list(grads), lr, wd, decays,
                                                             done)
            finally:
                if applied is not None and done.item():
                    applied(fused)
        return rest

    def span_scratch(self, device: torch.device, wanted: int = 1) -> tuple[torch.Tensor, ...]:
        """`wanted` spans of float32 scratch of the current stream on `device` (stream_key), grown when asked for more
        or when the span grows. One pool serves every caller that works a span at a time on that stream, each use
        done before the next starts in stream order: the update (its ε·z or z, and a second span for z with several
        perturbations) and the working copies' ε·z. On a GPU a span is up to 32 MiB: one pool instead of one per
        caller is that much less peak memory."""
        key, span = stream_key(device), self.span(device)
        bufs = self._spans.get(key)
        if bufs is None or bufs[0].numel() < span or len(bufs) < wanted:
            bufs = self._spans[key] = tuple(torch.empty(span, dtype=torch.float32, device=device)
                                            for _ in range(max(wanted, len(bufs or ()))))
        return bufs

    def span_scratch_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self._spans.values() for t in bufs)

    def _scratch_chunk(self, device: torch.device) -> torch.Tensor:
        """A chunk of float32 scratch per device and CUDA stream (stream_key)."""
        key = stream_key(device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(self.chunk, dtype=torch.float32, device=device)
        return buf

    def fill(self, out: torch.Tensor, seed: int, index: int, key: int, numel: int, start: int = 0,
             scale: float = 1.0) -> torch.Tensor:
        """Write z[start : start + out.numel()] of a parameter of `numel` elements into the flat float32 `out`,
        times `scale` (exactly `z.mul_(scale)`, but in the sampler's own pass where it can be)."""
        self.fill_many([(out, seed, index, key, numel, start)], scale)
        return out

    def fill_many(self, requests: list[tuple[torch.Tensor, int, int, int, int, int]], scale: float = 1.0) -> None:
        """`fill` for several (out, seed, index, key, numel, start) at once: their whole chunks are drawn together
        (in parallel on CPU), so many small parameters use every drawing thread too."""
        if requests and self.counter_based(requests[0][0].device):
            from . import triton_z
            for out, seed, index, key, numel, start in requests:
                _check_request(out, start, numel)
                if out.numel() > 1 and out.stride(0) != 1:
                    raise ValueError("the counter-based sampler writes z into contiguous buffers")
                triton_z.fill(out, start, slice_key(seed, index, key), scale, self.distribution == "gaussian")
                self.elements_drawn += out.numel()
            return
        whole: list[tuple[torch.Tensor, int]] = []
        c = self.chunk
        for out, seed, index, key, numel, start in requests:
            _check_request(out, start, numel)
            stop = start + out.numel()
            # chunks [w0, w1) lie whole inside [start, stop) (the parameter's last chunk may be short): drawn
            # straight into views of the output, made by one split; at most the first and the last chunk overlap
            # the slice partly and are drawn whole into scratch
            w0 = -(-start // c)
            w1 = max(w0, -(-stop // c) if stop == numel else stop // c)
            if w1 > w0:
                views = out[w0 * c - start:min(w1 * c, numel) - start].split(c)
                whole.extend(zip(views, [chunk_key(seed, index, key, k) for k in range(w0, w1)]))
            overlapped = range(start // c, (stop + c - 1) // c)
            for k in sorted({overlapped[0], overlapped[-1]} if overlapped else ()):
                if w0 <= k < w1:
                    continue
                lo, hi = k * c, min((k + 1) * c, numel)
                a, b = max(lo, start), min(hi, stop)
                tmp = self._scratch_chunk(out.device)[:hi - lo]
                self.draw_chunks([(tmp, chunk_key(seed, index, key, k))], scale)
                out[a - start:b - start].copy_(tmp[a - lo:b - lo])
        self.draw_chunks(whole, scale)

    def z(self, seed: int, index: int, key: int, numel: int, start: int = 0, stop: Optional[int] = None,
          device: torch.device | str = "cpu") -> torch.Tensor:
        """A new flat float32 tensor holding z[start:stop] (for tests and the fused kernels' self-check)."""
        stop = numel if stop is None else stop
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
        return self.fill(out, seed, index, key, numel, start)
