"""ZOSGD: the zeroth-order SGD optimizer (MeZO's SPSA update) and its step log.

One step t, given its seed s_t, the projected gradients g_1..g_q of its q perturbations, its lr and weight decay wd:
    θ ← θ − lr · ( (1/q) Σ_j g_j · z_j(s_t) + wd · θ )        (wd only for tensors of rank >= 2)
z_j is regenerated from the seed, never stored. The update is computed in float32 and rounded once into the stored
dtype. ZOEngine measures g (two forwards per perturbation) and hands the step here; the update itself is applied
either at once or fused into the next step's forward, unit by unit ("pending"), and `flush()` makes any pending update
visible. The step log [(step, seed, g, lr, wd)] alone reproduces the fine-tune from the base weights (ds_zo.replay).
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .model.units import is_decayed
from .perturb import PerturbationGenerator, slice_key, span_groups


@dataclass(frozen=True)
class StepRecord:
    step: int
    seed: int
    g: tuple[float, ...]   # one projected gradient per perturbation
    lr: float
    wd: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["g"] = list(self.g)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StepRecord":
        return cls(step=int(d["step"]), seed=int(d["seed"]), g=tuple(float(x) for x in d["g"]),
                   lr=float(d["lr"]), wd=float(d["wd"]))


# (flat slice of a parameter, parameter key, index of the slice's first element, parameter numel, weight decay applies)
Piece = tuple[torch.Tensor, int, int, int, bool]


def apply_step(param: torch.Tensor, key: int, record: StepRecord, decays: bool,
               generator: PerturbationGenerator) -> None:
    """Apply one recorded step to the whole of `param`, in place (replay; slices go through apply_step_pieces)."""
    apply_step_pieces([(param.view(-1), key, 0, param.numel(), decays)], record, generator)


def noting(reached: Optional[set]) -> Optional[Callable[[list], None]]:
    """A callback that notes updated pieces as (key, first element) in `reached` (None: nothing to note)."""
    if reached is None:
        return None
    return lambda pieces: reached.update((key, lo) for _, key, lo, _, _ in pieces)


def apply_step_pieces(pieces: list[Piece], record: StepRecord, generator: PerturbationGenerator,
                      buffers: Optional[tuple[torch.Tensor, ...]] = None,
                      reached: Optional[set] = None) -> None:
    """Apply one recorded step to several parameter slices at once (their z drawn together, in parallel on CPU).
    Evaluated in the order of the plain expression θ − lr·(g·z + wd·θ), so that a reference written that way agrees
    bit for bit (up to the sign of an exact zero). `reached` collects each piece's (key, first element) right after
    its last write (an update cut short by an out-of-memory error or an interrupt resumes after them)."""
    # the fused native sweep where it applies (CPU, float32): the same arithmetic as below, z never written out
    pieces = generator.update_fused(pieces, record.seed, record.g, record.lr, record.wd, noting(reached))
    if not pieces:
        return
    sizes = [flat.numel() for flat, *_ in pieces]
    total = sum(sizes)
    device = pieces[0][0].device
    q = len(record.g)
    if buffers is None:
        buffers = tuple(torch.empty(total, dtype=torch.float32, device=device) for _ in range(min(q, 2)))
    # z is a second draw's scratch: only several perturbations (q > 1) need it
    u, z = buffers[0][:total], (buffers[1][:total] if q > 1 else None)
    offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
    # z·g comes from the sampler as z·|g| (its own pass, no multiply pass): u holds sign · Σ g_j·z_j, and since
    # rounding is symmetric, adding or subtracting |g_j|·z_j gives the plain expression's values exactly (as numbers:
    # an exact zero can come out with the other sign)
    sign = 1.0
    for j, g in enumerate(record.g):
        target = z if j else u
        generator.fill_many([(target[o:o + n], record.seed, j, key, numel, start)
                             for (_, key, start, numel, _), o, n in zip(pieces, offsets, sizes)], scale=abs(g))
        if not j:
            sign = math.copysign(1.0, g)
        elif math.copysign(1.0, g) == sign:
            u.add_(z)
        else:
            u.sub_(z)
    if q > 1:
        u.div_(q)
    for (flat, key, lo, _, decays), o, n in zip(pieces, offsets, sizes):
        step, down = u[o:o + n], sign > 0       # θ − lr·step with step = ±u
        if decays and record.wd != 0.0:
            if not down:
                step.neg_()
                down = True
            step.add_(flat.float() * record.wd)    # (no copy for float32)
        step.mul_(record.lr)
        # computed in float32 (a 16-bit θ widens exactly inside the kernel) and rounded once into θ's dtype
        (torch.sub if down else torch.add)(flat, step, out=flat)
        if reached is not None:
            reached.add((key, lo))


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD. Selected in ds_config.json as {"optimizer": {"type": "ZOSGD", "params": {...}}} and built
    by ds_zo.initialize, which attaches the perturbation generator and parameter keys."""

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"optimizer.params.lr: {lr} must be >= 0")
        if not eps > 0:
            raise ValueError(f"optimizer.params.eps: {eps} must be > 0")
        if weight_decay < 0:
            raise ValueError(f"optimizer.params.weight_decay: {weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.eps = eps
        self.generator: Optional[PerturbationGenerator] = None
        self.keys: dict[int, int] = {}
        self.rows: dict[int, torch.Tensor] = {}
        self.names: dict[int, str] = {}
        self.step_log: list[StepRecord] = []
        self.pending: Optional[StepRecord] = None
        self._pending_done: set[int] = set()
        # (parameter key, first element) of the pieces the pending update has reached, while their parameter is not
        # done: an update that fails part-way (out of memory between span groups, an interrupt) resumes where it
        # stopped, and applies no piece twice
        self._pieces_done: set[tuple[int, int]] = set()
        self._decay_of: Optional[tuple[bool, dict[int, bool]]] = None   # (decay on, id(param) -> decays)
        self._decay_checked: Optional[list[float]] = None     # the groups' weight_decay values last checked
        # _apply_fused's layouts: (parameters, q, their addresses) -> (launches, base) or False (the general path)
        self._fused_layouts: dict[tuple, object] = {}

    # -- wiring -------------------------------------------------------------------------------------------------
    def attach(self, generator: PerturbationGenerator, keys: dict[int, int],
               rows: Optional[dict[int, torch.Tensor]] = None, names: Optional[dict[int, str]] = None) -> None:
        """keys: id(param) -> perturbation key; rows: id(param) -> the rows (dim 0) trained, for row subsets;
        names: id(param) -> name, for messages."""
        self.generator, self.keys, self.rows, self.names = generator, keys, rows or {}, names or {}
        self._fused_layouts.clear()      # (they hold which parameters are row subsets: an optimizer handed to a new
                                         # engine may have other rows)
        missing = [p for g in self.param_groups for p in g["params"] if id(p) not in keys]
        if missing:
            raise ValueError(f"{len(missing)} optimizer parameters are not parameters of the engine's model")

    def step(self, closure: Optional[Callable] = None):
        """DeepSpeed calls step() after each ZO step (and bf16 wrappers at init): nothing to do, ZOEngine.train_batch
        already measured g and handed the update over with record_step()."""
        if closure is not None:
            raise TypeError("ZOSGD does not take a closure: train with ds_zo.initialize(...) and engine.train_batch()")
        return None

    def current_lr(self) -> float:
        lrs = {g["lr"] for g in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"ZOSGD needs one lr across parameter groups, got {sorted(lrs)}")
        return lrs.pop()

    def weight_decay(self) -> float:
        """The decoupled weight decay a step applies (and records: replay applies it to the same matrices): the one
        non-zero weight_decay of the parameter groups, 0 if none. Read from the groups at every step, so a restored
        or edited optimizer state and the step log always agree; groups edited so that a 1-D tensor would decay or a
        matrix would not are refused (check_decay_groups), since a step records one value for every matrix."""
        values = [float(g["weight_decay"]) for g in self.param_groups]
        nonzero = sorted(set(values) - {0.0})
        if len(nonzero) > 1:
            raise ValueError(f"ZOSGD needs one non-zero weight_decay across parameter groups (a step records one), "
                             f"got {nonzero}")
        if nonzero and values != self._decay_checked:
            self.check_decay_groups()
            self._decay_checked = values
        return nonzero[0] if nonzero else 0.0

    def check_decay_groups(self, names: Optional[dict[int, str]] = None) -> None:
        """Where some group's weight_decay is not 0, it must be on exactly the groups of matrices and embeddings (rank
        >= 2, is_decayed): ds_zo decays those, and only those, by the one value a step records (names: id -> name,
        for the message)."""
        if not any(g["weight_decay"] for g in self.param_groups):
            return
        names = names or self.names
        wrong = [(i, g, p) for i, g in enumerate(self.param_groups) for p in g["params"]
                 if (g["weight_decay"] != 0.0) != is_decayed(p)]
        if not wrong:
            return
        # a decaying 1-D tensor first: where someone set a group of them, that is the edit to name
        i, g, p = min(wrong, key=lambda w: w[1]["weight_decay"] == 0.0)
        what = repr(names[id(p)]) if names and id(p) in names else f"of shape {tuple(p.shape)}"
        raise ValueError(f"optimizer.param_groups[{i}]: weight_decay {g['weight_decay']!r} on a parameter {what} of "
                         f"rank {len(getattr(p, 'ds_shape', p.shape))}; ds_zo decays exactly the matrices and "
                         "embeddings (rank >= 2) by a step's one weight_decay, which replay relies on: set it on the "
                         "groups that hold those (ds_zo builds one group of them and one of 1-D tensors) and leave 0 "
                         "on the others")

    def groups_changed(self) -> None:
        """The parameter groups' settings were edited in place (a checkpoint restored them): forget what was cached."""
        self._decay_checked = None
        self._fused_layouts.clear()

    def _decays(self) -> dict[int, bool]:
        """Per trained parameter, whether the pending step decays it: a matrix (is_decayed) where the step's
        weight_decay is not 0. From the step's record, not the groups, which may have been edited since."""
        on = self.pending is not None and self.pending.wd != 0.0
        if self._decay_of is None or self._decay_of[0] != on:
            self._decay_of = (on, {id(p): on and is_decayed(p) for g in self.param_groups for p in g["params"]})
        return self._decay_of[1]

    # -- the update -----------------------------------------------------------------------------------------------
    def record_step(self, step: int, seed: int, grads: list[float], lr: float, weight_decay: float) -> StepRecord:
        if self.pending is not None:
            raise RuntimeError("the previous step's update was not fully applied before a new step was recorded")
        record = StepRecord(step=step, seed=seed, g=tuple(float(g) for g in grads), lr=float(lr),
                            wd=float(weight_decay))
        self.step_log.append(record)
        self.pending, self._pending_done, self._pieces_done = record, set(), set()
        return record

    def _pieces(self, param, flat: torch.Tensor, start: int, numel: int, decays: bool) -> list[Piece]:
        """`flat` (elements [start, start + flat.numel()) of a parameter of `numel` elements) cut into pieces of one
        element-wise pass (whole z chunks: no chunk is drawn for two pieces), less those the pending update has
        already reached (`_pieces_done`: an update that failed part-way)."""
        c, out, lo, stop = self.generator.pass_elements(flat.device), [], start, start + flat.numel()
        key = self.keys[id(param)]
        while lo < stop:
            hi = min((lo // c + 1) * c, stop)
            if (key, lo) not in self._pieces_done:
                out.append((flat[lo - start:hi - start], key, lo, numel, decays))
            lo = hi
        return out

    def _apply_pieces(self, pieces: list[Piece], reached: Optional[set] = None) -> None:
        """The pending step on these pieces: by the fused native sweep where it applies (CPU float32: no scratch),
        the rest a span at a time, whose float32 scratch stays one span (two with several perturbations), not
        copies of the largest parameter (the update is elementwise: same result bit for bit). `reached` collects
        each piece's (key, first element) as soon as its update has run."""
        if pieces:   # the fused native sweep takes all it can at once (its chunks spread over the threads)
            pieces = self.generator.update_fused(pieces, self.pending.seed, self.pending.g, self.pending.lr,
                                                 self.pending.wd, noting(reached))
        if not pieces:
            return
        device = pieces[0][0].device
        # the generator's span scratch of this stream (a resliced shard is updated on the all-gather's stream while
        # the compute stream updates the resident units: each stream has its own), shared with the working copies
        buffers = self.generator.span_scratch(device, min(2, len(self.pending.g)))
        for group in span_groups(pieces, [piece[0].numel() for piece in pieces], self.generator.span(device)):
            apply_step_pieces(group, self.pending, self.generator, buffers, reached)

    def apply_pending(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Apply the pending update to these parameters (each at most once): the fused path, unit by unit.
        Returns whether any parameter changed."""
        if self.pending is None:
            return False
        params = list(params)
        fused = self._apply_fused(params)
        if fused is not None:
            return fused
        decays = self._decays()
        whole: dict[torch.device, list[Piece]] = {}
        subsets: list[tuple] = []
        owed: dict[torch.device, list[torch.nn.Parameter]] = {}
        for p in params:
            if id(p) not in decays or id(p) in self._pending_done:
                continue
            rows = self.rows.get(id(p))
            if rows is not None:       # a row subset: its update runs on a gathered copy, written back whole
                target = p.data[rows]
                subsets.append((p, rows, target,
                                self._pieces(p, target.view(-1), 0, target.numel(), decays[id(p)])))
                continue
            whole.setdefault(p.device, []).extend(
                self._pieces(p, p.data.view(-1), 0, p.numel(), decays[id(p)]))
            owed.setdefault(p.device, []).append(p)
        # A parameter counts as updated once all its pieces were: an update that fails part-way (out of memory for a
        # temporary between span groups, an interrupt) leaves the rest owed, and the next read applies only that
        changed = False
        for device, pieces in whole.items():
            self._apply_pieces(pieces, self._pieces_done)
            changed |= bool(pieces)
            self._pending_done.update(id(p) for p in owed[device])
        for p, rows, target, pieces in subsets:
            self._apply_pieces(pieces)      # a failure discards the copy: the parameter is untouched and owed
            p.data[rows] = target
            self._pending_done.add(id(p))
            changed |= bool(pieces)
        return changed

    def _apply_fused(self, params: list[torch.nn.Parameter]) -> Optional[bool]:
        """apply_pending for parameters that all take the fused Triton update whole (one device and dtype,
        contiguous, no row subsets, none updated in part: a unit of the GPUs' decoder layers): one launch from a
        layout kept per parameter list and addresses, so that a step pays only its keys, not the general path's
        per-piece cutting and table rows. Returns whether any parameter changed, or None where the general path
        applies. Each launch notes its parameters as updated as soon as it is issued (as `update_fused` does)."""
        decays = self._decays()
        todo = [p for p in params if id(p) in decays and id(p) not in self._pending_done]
        if not todo:
            return None
        if self._pieces_done:
            # a parameter an update left part-way resumes on the general path, piece by piece (the pieces of
            # parameters done are kept too, and their parameters are not in `todo`)
            partial = {key for key, _ in self._pieces_done}
            if any(self.keys[id(p)] in partial for p in todo):
                return None
        datas = [p.data for p in todo]
        d0, q = datas[0], len(self.pending.g)
        if not (self.generator.fuses(d0.device, d0.dtype) and self.generator.counter_based(d0.device)):
            return None
        from . import triton_passes
        if q > triton_passes.MAX_Q:
            return None
        key = (tuple(id(p) for p in todo), q, triton_passes.address_key(datas), self.pending.wd != 0.0)
        layout = triton_passes.kept_layout(self._fused_layouts, key,
                                           lambda: self._fused_layout(todo, datas, q, decays))
        if layout is False:
            return None
        launches, base = layout
        seed = self.pending.seed
        keys = [[slice_key(seed, j, self.keys[id(p)]) for j in range(q)] for p in todo]

        def launched(i: int, j: int) -> None:
            self._pending_done.update(id(p) for p in todo[i:j])

        self.generator.elements_drawn += launches.run(
            keys, datas[base].view(-1), self.pending.g, self.pending.lr, self.pending.wd,
            self.generator.distribution == "gaussian", launched)
        return launches.drawn > 0

    def _fused_layout(self, params: list, datas: list[torch.Tensor], q: int, decays: dict[int, bool]):
        """_apply_fused's layout of these parameters, or False where they do not qualify."""
        from . import triton_passes
        d0 = datas[0]
        if (any(id(p) in self.rows for p in params)
                or any(t.device != d0.device or t.dtype != d0.dtype or not t.is_contiguous() for t in datas)):
            return False
        base, offs = triton_passes.offsets(datas)
        rows = [(off, t.numel(), 0, decays[id(p)]) for off, p, t in zip(offs, params, datas)]
        return triton_passes.UpdateLaunches(rows, q), base

    def apply_pending_to_slices(self, slices: Sequence[tuple[torch.nn.Parameter, torch.Tensor, int, int]]) -> None:
        """Apply the pending update to each `flat`, the elements [start, start + flat.numel()) of its `param` (a
        ZeRO-3 shard of a parameter of `numel` elements; together a resliced unit's shard): their pieces in one pass
        (one fused launch on a GPU, not one per parameter); the parameters count as updated once all their pieces
        are (a failure part-way leaves them owed, and the pieces already updated are skipped)."""
        decays = self._decays()
        pieces = [piece for param, flat, start, numel in slices if flat.numel()
                  for piece in self._pieces(param, flat, start, numel, decays[id(param)])]
        self._apply_pieces(pieces, self._pieces_done)
        self._pending_done.update(id(param) for param, *_ in slices)

    def owes(self, param: torch.nn.Parameter) -> bool:
        """Whether the pending update still has to be applied to this parameter."""
        return self.pending is not None and id(param) not in self._pending_done and id(param) in self._decays()

    def flush(self) -> None:
        """Make the pending update visible on every parameter; idempotent. Under an engine this is the engine's
        flush: offloaded parameters are updated through its pipeline (z drawn on the device, resliced shards), where
        this optimizer alone would draw z on the host, or find only placeholders and count the update as applied."""
        engine_flush = self._engine_flush() if getattr(self, "_engine_flush", None) is not None else None
        (engine_flush or self.flush_resident)()

    def flush_resident(self) -> None:
        """flush() on the parameters as they are (the engine's flush calls it once offloaded units are done)."""
        if self.pending is None:
            return
        self.apply_pending(p for g in self.param_groups for p in g["params"])
        self.pending, self._pending_done, self._pieces_done = None, set(), set()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def flush_through(self, flush: Optional[Callable[[], None]]) -> None:
        """Let state_dict() flush with the engine's flush (a bound method, held weakly; None: no engine), once the
        engine is built: offloaded parameters are updated through its pipeline, where z is drawn on the device and
        resliced shards live."""
        self._engine_flush = weakref.WeakMethod(flush) if flush is not None else None

    def state_dict(self):
        self.flush()
        sd = super().state_dict()
        sd["zo_step_log"] = [r.to_json() for r in self.step_log]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        log = state_dict.pop("zo_step_log", [])
        super().load_state_dict(state_dict)
        self.groups_changed()
        self.step_log = [StepRecord.from_json(r) for r in log]
        self.pending, self._pending_done, self._pieces_done = None, set(), set()
