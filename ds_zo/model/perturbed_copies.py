"""Working copies θ ± εz of one unit at a time, built into reused flat buffers.

A forward runs a list of *slots*, one per block of `rows` rows of the batch: (j, +1) and (j, −1) for each perturbation
j of the step (or a single slot under perturbation parallelism), or `None` for the unperturbed θ (evaluation).

Entering a unit: its parameters are made resident (offload pipeline), the optimizer applies the pending (fused) update
of the previous step to them, then z_j is drawn once per perturbation, a group of whole chunks at a time (several
parameters' chunks together, drawn on worker threads on CPU), into a float32 scratch buffer, and both signs are
formed from it in float32, rounded once into the parameter's dtype. On CPU, float32 units skip the scratch: one
native sweep per chunk draws z a tile at a time and writes both signs (`_form_fused`, native/z_passes.h; the same
values). z is thus drawn once per step to perturb and once
more (next step) to update: two draws per element per step (MeZO's in-place loop draws four). A weight used by two
units (a tied embedding and output layer) is drawn twice as well: on CPU the embedding keeps its ids' rows' ε·z for
the output layer (`id_rows`); where z is counter-based and the fused kernels run (GPUs) the embedding draws only its
ids' rows (`_id_rows_fused`: 2 + ids / vocabulary draws per element of that weight); elsewhere its chunks are drawn
again in its second unit unless `tied_z_cache` keeps them.

`acquire` forms whole copies of a unit (decoder layers); `working_rows` forms any block of rows of one parameter's
copies (embedding and output-layer units, see streamed.py), so no buffer is ever vocabulary-sized.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import torch
from torch._utils import _unflatten_dense_tensors

from ..perturb import PerturbationGenerator, chunk_key, slice_key, span_groups
from .units import Unit

OUTPUT_ROLE = "output:"           # FlatBuffers role prefix of the streamed units' kept outputs (PerturbedCopies.output)
Slot = Optional[tuple[int, int]]   # (perturbation index, sign) or None for the unperturbed parameters


def _shifted(master: torch.Tensor, ez: torch.Tensor, sign: int, out: torch.Tensor) -> None:
    """out = master ± ε·z, computed in float32 and rounded once into out's dtype: the one expression every working
    copy is formed with (whole copies and row blocks alike, so they agree bit for bit). A 16-bit master widens
    exactly inside the kernel: one pass per slot, no float32 copy of the master."""
    (torch.add if sign > 0 else torch.sub)(master, ez, out=out)


class FlatBuffers:
    """Grow-only flat buffers per (role, device, dtype): no allocation churn once the largest unit has been seen."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        k = (role, device, dtype)
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[k] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def drop(self, prefix: str) -> None:
        """Free the buffers of the roles starting with prefix (they are re-allocated when next asked for)."""
        for k in [k for k in self._bufs if k[0].startswith(prefix)]:
            del self._bufs[k]

    def nbytes(self, prefix: str = "") -> int:
        """Bytes held by the buffers of the roles starting with prefix (all of them by default)."""
        return sum(b.numel() * b.element_size() for k, b in self._bufs.items() if k[0].startswith(prefix))


class Residency:
    """Where a unit's parameters live while it computes. The resident case: always there, nothing to move."""

    def enter(self, unit: Unit) -> None:
        pass

    def exit(self, unit: Unit, dirty: bool) -> None:
        pass

    def repoints(self, unit: Unit) -> bool:
        """Whether `exit` points the unit's parameters somewhere else (its store) whatever they point at."""
        return False


class PerturbedCopies:
    """dual_forward's provider: per slot, the tensors a unit's trainable parameters point at while it computes."""

    def __init__(self, generator: PerturbationGenerator, keys: dict[int, int], eps: float,
                 residency: Optional[Residency] = None, before_perturb: Optional[Callable[[Unit], bool]] = None):
        self.generator = generator
        self.keys = keys                          # id(param) -> perturb.param_key(canonical name)
        self.eps = eps
        self.residency = residency or Residency()
        self.before_perturb = before_perturb      # applies the pending update; returns whether it changed anything
        self.buffers = FlatBuffers()
        # output(): the streamed output layer's logits kept from forward to forward; only for an owner that reads
        # each forward's logits before the next (ZOEngine), since the next forward overwrites them
        self.keep_output = False
        # (unit name, loss.StreamedTokenLoss): set by the engine around a forward whose loss takes that streamed
        # unit's output block by block
        self.token_loss: Optional[tuple] = None
        # zero_order.row_blocks: whether embedding / output-layer units compute from row blocks (streamed.py)
        self.row_blocks = "auto"
        self.seed: Optional[int] = None
        self.slots: list[Slot] = [None]
        self._dirty: dict[int, bool] = {}
        self._ez_cache: list[tuple[tuple, torch.Tensor, str]] = []
        # tied_z_cache: id(param) of the weights used by two units whose ε·z is kept whole between them
        self.keep_whole: set[int] = set()
        # id(param) of the weights used by two units (a tied embedding and output layer). On CPU an embedding forms
        # only the rows its ids use, from the z of those rows alone (`id_rows`); a shared one keeps their ε·z (per
        # perturbation: seed, their elements, the values, their chunks' bounds) for the output layer, which draws the
        # rest of each chunk around them: every z value of the weight drawn once per unit pass, not once in each unit
        self.shared: set[int] = set()
        self._row_ez: dict[tuple[int, int], tuple] = {}
        self._whole_ez: dict[tuple[int, int], tuple[torch.Tensor, set, Optional[int]]] = {}
        self._rows_on_device: dict[int, torch.Tensor] = {}
        # _copies_fused's layouts: (parameter refs, slots, their addresses) -> (launches, base, keys, length) or
        # False where the general path applies
        self._fused_layouts: dict[tuple, object] = {}

    def set_slots(self, seed: Optional[int], slots: Sequence[Slot]) -> None:
        if any(s is not None for s in slots) and seed is None:
            raise ValueError("perturbed slots need a step seed")
        self.seed, self.slots = seed, list(slots)
        self._ez_cache.clear()

    def _scaled_z(self, ref, j: int, chunk: int, numel: int) -> torch.Tensor:
        """ε·z_j of one whole z chunk of `ref`'s parameter (z over `numel` elements), from the cache `_prefetch`
        fills (or drawn now)."""
        if id(ref.param) in self.keep_whole:
            return self._kept_z(ref, j, chunk, numel)
        k = (self.seed, j, self.keys[id(ref.param)], chunk)
        for key, t, _ in self._ez_cache:
            if key == k:
                return t
        self._prefetch(ref, j, [chunk], numel)
        return self._ez_cache[-1][1]

    def _prefetch(self, ref, j: int, chunks: list[int], numel: int) -> None:
        """Draw ε·z_j of these chunks of ref's parameter into the cache, all in one sampler call (in parallel on CPU),
        skipping those already there. Row blocks are visited in order, a block covers about one drawing span and a
        chunk can straddle two blocks: with room for one span and one chunk per perturbation, each chunk is drawn once
        per unit visit."""
        key = self.keys[id(ref.param)]
        have = {entry[0] for entry in self._ez_cache}
        chunks = [k for k in chunks if (self.seed, j, key, k) not in have]
        room = self._ez_room(ref.param.device)
        if len(chunks) > room:
            raise ValueError(f"{len(chunks)} z chunks at once, the ε·z cache holds {room} per perturbation")
        c, pieces = self.generator.chunk, []
        for k in chunks:
            mine = [i for i, entry in enumerate(self._ez_cache) if entry[0][1] == j]
            # each perturbation's chunks in their own scratch, reused in turn: the oldest one is refilled
            role = f"ez{j}.{len(mine)}" if len(mine) < room else self._ez_cache.pop(mine[0])[2]
            z = self.buffers.get(role, min(c, numel - k * c), torch.float32, ref.param.device)
            pieces.append((z, k))
            self._ez_cache.append(((self.seed, j, key, k), z, role))
        self._draw_ez(ref, j, pieces, numel)

    def _draw_ez(self, ref, j: int, pieces: list[tuple[torch.Tensor, int]], numel: int) -> None:
        """z := ε·z_j of chunk k of ref's parameter for each (z, k): around the rows an earlier unit kept where it
        kept some (`_draw_around_rows`), the others whole in one sampler call (in parallel on CPU)."""
        key, c = self.keys[id(ref.param)], self.generator.chunk
        requests = [(z, self.seed, j, key, numel, k * c) for z, k in pieces if not self._draw_around_rows(ref, j, k, z)]
        if requests:
            self.generator.fill_many(requests, scale=self.eps)

    def id_rows(self, ref, needed: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Per slot, the rows `needed` (sorted, unique) of that slot's working copy of an embedding's weight: the
        values the block path gives, bit for bit, from only those rows' z (groups of 16 values; the vectorised CPU
        sampler skips the rest: the other rows' z is not needed to perturb). For a weight shared with a later unit
        their ε·z is kept for it (`_draw_around_rows`). None where this does not apply; the caller then forms whole
        row blocks."""
        p = ref.param.data
        c, numel = self.generator.chunk, p.numel()
        d = numel // max(1, p.shape[0])
        if id(ref.param) in self.keep_whole or ref.rows is not None or not self.perturbs():
            return None
        if self._fuses_rows(p):
            return self._id_rows_fused(ref, needed, d)
        if p.device.type != "cpu" or d % 16 or c % 16 or numel % 16:
            return None
        elems = (needed.to(torch.int64)[:, None] * d + torch.arange(d)).reshape(-1)     # ascending
        ks = torch.unique_consecutive(elems // c)
        starts = torch.searchsorted(elems, ks * c).tolist()
        ends = torch.searchsorted(elems, (ks + 1) * c).tolist()
        ks = ks.tolist()
        key = self.keys[id(ref.param)]
        ez = {}
        for j in self._perturbations():
            vals = torch.empty(elems.numel(), dtype=torch.float32)
            for k, a, b in zip(ks, starts, ends):
                local = elems[a:b] - k * c
                scratch = self.buffers.get("rows_z", min(c, numel - k * c), torch.float32, p.device)
                groups = torch.zeros(scratch.numel() // 16, dtype=torch.uint8)
                groups[local // 16] = 1
                if not self.generator.draw_groups(scratch, chunk_key(self.seed, j, key, k), self.eps, groups):
                    self.buffers.drop("rows_z")   # this sampler draws whole chunks only (decided at the first one)
                    return None
                vals[a:b] = scratch[local]
            ez[j] = vals
        self.buffers.drop("rows_z")          # a chunk of scratch, not kept past the embedding's visit
        if id(ref.param) in self.shared:
            for j, vals in ez.items():
                self._row_ez[(id(ref.param), j)] = (self.seed, elems, vals, dict(zip(ks, zip(starts, ends))))
        master = p.reshape(-1)[elems]
        shape = (needed.numel(), *p.shape[1:])
        outs = []
        for i, slot in enumerate(self.slots):
            if slot is None:
                outs.append(master.view(shape))
                continue
            out = self.buffers.get(f"idrows{i}", elems.numel(), p.dtype, p.device)
            _shifted(master, ez[slot[0]], slot[1], out)
            outs.append(out.view(shape))
        return outs

    def _fuses_rows(self, t: torch.Tensor) -> bool:
        """Whether rows of a weight like t take the fused rows kernel (triton_passes.perturb_rows): counter-based z
        and the fused kernels on its device and dtype (the GPUs), contiguous, at most two slots per perturbation."""
        g = self.generator
        return (t.is_contiguous() and g.fuses(t.device, t.dtype) and g.counter_based(t.device)
                and all(len(self._targets(j)) <= 2 for j in self._perturbations()))

    def _targets(self, j: int) -> list[tuple[int, int]]:
        """(slot, sign) of perturbation j's slots."""
        return [(i, slot[1]) for i, slot in enumerate(self.slots) if slot is not None and slot[0] == j]

    def _id_rows_fused(self, ref, needed: torch.Tensor, d: int) -> list[torch.Tensor]:
        """id_rows by one launch per perturbation that reads the ids on the device: no other row's z is drawn and
        the host neither waits for the ids nor lays out a table. The rows' ε·z is not kept for a later unit: with
        counter-based z it is only redrawn (the ids' rows, twice per step)."""
        p = ref.param.data
        rows = needed.to(torch.int64).contiguous()
        outs: list[Optional[torch.Tensor]] = [p[rows] if slot is None else
                                              self.buffers.get(f"idrows{i}", rows.numel() * d, p.dtype, p.device)
                                              for i, slot in enumerate(self.slots)]
        self._form_rows(ref, p.view(-1), outs, d, rows=rows)
        shape = (rows.numel(), *p.shape[1:])
        return [o.view(shape) for o in outs]

    def _form_rows(self, ref, master: torch.Tensor, outs: list, length: int, rows: Optional[torch.Tensor] = None,
                   start: int = 0) -> None:
        """Each perturbation's slots of outs (by slot) from master by the rows kernel (triton_passes.perturb_rows:
        listed rows of `length`, or one range at z offset `start`), one launch per perturbation."""
        from .. import triton_passes
        gaussian = self.generator.distribution == "gaussian"
        for j in self._perturbations():
            targets = self._targets(j)
            self.generator.elements_drawn += triton_passes.perturb_rows(
                master, [outs[i] for i, _ in targets], [sign for _, sign in targets],
                slice_key(self.seed, j, self.keys[id(ref.param)]), self.eps, length, rows=rows, start=start,
                gaussian=gaussian)

    def _draw_around_rows(self, ref, j: int, k: int, z: torch.Tensor) -> bool:
        """z := ε·z_j of chunk k of a shared weight whose earlier unit kept some rows' ε·z this step: those rows
        copied in, only the rest drawn. False where there is nothing kept for this chunk (draw it whole)."""
        kept = self._row_ez.get((id(ref.param), j))
        if kept is None or kept[0] != self.seed or k not in kept[3]:
            return False
        _, elems, vals, bounds = kept
        a, b = bounds[k]
        local = elems[a:b] - k * self.generator.chunk
        groups = torch.ones(z.numel() // 16, dtype=torch.uint8)
        groups[local // 16] = 0
        if not self.generator.draw_groups(z, chunk_key(self.seed, j, self.keys[id(ref.param)], k), self.eps, groups):
            return False
        z[local] = vals[a:b]
        return True

    def _ez_room(self, device: torch.device) -> int:
        """ε·z chunks the cache holds per perturbation: the chunks one sampler call draws at once (a CPU row block's,
        on its threads) and the chunk a block shares with the last. On accelerators, whose blocks span several chunks
        drawn one launch each, that is 2: the edge chunks a block shares with its neighbours; its whole chunks are
        formed a span at a time (`_perturb_spans`: one pass per slot, not one per chunk, and no cache of a span)."""
        return self.generator.parallel_chunks(device) + 1

    def _perturbations(self) -> list[int]:
        """The perturbation indices the current slots use, in order."""
        return sorted({s[0] for s in self.slots if s is not None})

    def _fill_scaled(self, z: torch.Tensor, ref, j: int, chunk: int, numel: int) -> torch.Tensor:
        """z := ε·z_j of chunk `chunk` of ref's parameter (z over `numel` elements)."""
        return self.generator.fill(z, self.seed, j, self.keys[id(ref.param)], numel, start=chunk * self.generator.chunk,
                                   scale=self.eps)

    def _kept_z(self, ref, j: int, chunk: int, numel: int) -> torch.Tensor:
        """ε·z_j of a chunk of a tied weight, from a whole-weight buffer filled as its chunks are first drawn in this
        step: the weight's second unit (the output layer after the embedding) draws nothing."""
        c = self.generator.chunk
        buf, filled, seed = self._whole_ez.get((id(ref.param), j), (None, set(), None))
        if buf is None or buf.numel() != numel:
            buf = torch.empty(numel, dtype=torch.float32, device=ref.param.device)
        if seed != self.seed:
            filled = set()
        self._whole_ez[(id(ref.param), j)] = (buf, filled, self.seed)
        z = buf[chunk * c:min(numel, (chunk + 1) * c)]
        if chunk not in filled:
            self._fill_scaled(z, ref, j, chunk, numel)
            filled.add(chunk)
        return z

    def block_rows(self, ref) -> int:
        """Rows per block of `working_rows`: about one drawing span's (on CPU the chunks drawn at once, one per
        thread; on accelerators 8 chunks), a multiple of 64 — measured on CPU, a matmul over a block of output
        features differs from the whole matmul whenever a block starts off a multiple of 16 (for inputs of <= 5
        rows), and matched it in 400 random shapes otherwise (cuBLAS rounds a block unlike the whole: streamed.py)."""
        p = ref.param
        rows = self.generator.span(p.device) // max(1, p.numel() // max(1, p.shape[0]))
        return max(64, rows // 64 * 64)

    def perturbs(self) -> bool:
        return any(s is not None for s in self.slots)

    def output(self, unit: Unit, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A streamed unit's output (the output layer's: every slot's logits), in a buffer of that unit's kept from
        forward to forward when keep_output is set: a fresh tensor pays its page faults again on every step (SmolLM2 at
        16 × 64 tokens: 400 MB of logits, 0.2 s of a 7 s step); the cost is its size held through the next step's
        decoder layers too (peak +1.5 % at 4 × 64, within the noise at 16 × 64). The next forward overwrites it, so
        only an owner that reads it first turns this on (the engine: its loss reads the logits right after the
        forward); the engine also drops the buffers before a direct use of the model, so an evaluation forward's own
        logits never sit beside them. One buffer per unit: a streamed unit's input may be another's output."""
        if not self.keep_output:
            return torch.empty(shape, dtype=dtype, device=device)
        return self.buffers.get(OUTPUT_ROLE + unit.name, math.prod(shape), dtype, device).view(shape)

    def loss_sink(self, unit: Unit):
        if self.token_loss is not None and self.token_loss[0] == unit.name:
            return self.token_loss[1]
        return None

    def drop_whole_copies(self) -> None:
        """Free the whole-unit slot buffers: called when a row-block unit (embedding, output layer) computes, whose
        peak (the logits) then does not stack on buffers sized by the largest decoder layer."""
        self.buffers.drop("slot")

    def _perturb_range(self, ref, base: torch.Tensor, a: int, b: int, numel: int, outs: list) -> None:
        """outs[i][:b-a] = base ± ε·z_j over elements [a, b) of a z space of `numel` elements (base holds the master
        values of those elements): every slot of a perturbation from one ε·z draw. A range of up to the ε·z cache's
        room (a CPU row block) goes chunk by chunk through the cache; a larger one (an accelerator's row block, a span
        of rows: see _ez_room) forms its whole chunks a span at a time and only its partial edge chunks, which a
        neighbouring block may share, through the cache: either way each chunk is drawn once per unit visit."""
        c = self.generator.chunk
        if id(ref.param) in self.keep_whole:
            self._perturb_chunks(ref, base, a, a, b, numel, outs)
            return
        if self._fuses_rows(base) and not any(key[0] == id(ref.param) for key in self._row_ez):
            # counter-based z: the range in one launch per perturbation, its edge chunks too (no cache needed); a
            # row subset's unperturbed slot has no out (None)
            self._form_rows(ref, base, [None if o is None else o[:b - a] for o in outs], b - a, start=a)
            return
        if (b - 1) // c - a // c + 1 <= self._ez_room(base.device):
            for j in self._perturbations():
                self._prefetch(ref, j, list(range(a // c, (b - 1) // c + 1)), numel)   # drawn at once
            self._perturb_chunks(ref, base, a, a, b, numel, outs)
            return
        inner_lo, inner_hi = -(-a // c) * c, b // c * c           # the whole chunks inside [a, b)
        self._perturb_chunks(ref, base, a, a, inner_lo, numel, outs)
        self._perturb_spans(ref, base, a, inner_lo, inner_hi, numel, outs)
        self._perturb_chunks(ref, base, a, inner_hi, b, numel, outs)

    def _perturb_chunks(self, ref, base: torch.Tensor, a: int, lo: int, hi: int, numel: int, outs: list) -> None:
        """Elements [lo, hi) of a range starting at a, chunk by chunk, each ε·z chunk from the cache."""
        c = self.generator.chunk
        for k in range(lo // c, (hi - 1) // c + 1) if lo < hi else ():
            l, h = max(lo, k * c), min(hi, (k + 1) * c)
            master = base[l - a:h - a]
            for i, slot in enumerate(self.slots):
                if slot is None:
                    continue
                j, sign = slot
                _shifted(master, self._scaled_z(ref, j, k, numel)[l - k * c:h - k * c], sign, outs[i][l - a:h - a])

    def _perturb_spans(self, ref, base: torch.Tensor, a: int, lo: int, hi: int, numel: int, outs: list) -> None:
        """Elements [lo, hi) (whole chunks) of a range starting at a, one span-aligned piece at a time: each piece's
        ε·z is drawn into scratch (not cached) and every slot of its perturbation is formed from it in one pass."""
        span, c = self.generator.span(base.device), self.generator.chunk
        while lo < hi:
            end = min(hi, (lo // span + 1) * span)
            ez = self._span_z(base.device, end - lo)
            master = base[lo - a:end - a]
            for j in self._perturbations():
                self._draw_ez(ref, j, [(ez[k * c - lo:(k + 1) * c - lo], k) for k in range(lo // c, end // c)], numel)
                for i, slot in enumerate(self.slots):
                    if slot is not None and slot[0] == j:
                        _shifted(master, ez, slot[1], outs[i][lo - a:end - a])
            lo = end

    def working_rows(self, ref, r0: int, r1: int) -> list[torch.Tensor]:
        """Rows [r0, r1) (dim 0) of every slot's working copy of `ref`'s parameter, formed into block-sized buffers:
        the values `acquire` puts in a whole copy, bit for bit. The unperturbed slot gets a view of the master."""
        p = ref.param.data
        d = p.numel() // max(1, p.shape[0])
        shape = (r1 - r0, *p.shape[1:])
        out = [p[r0:r1] if slot is None else self.buffers.get(f"rows{i}", (r1 - r0) * d, p.dtype, p.device)
               for i, slot in enumerate(self.slots)]
        if ref.rows is None:
            self._perturb_range(ref, p.reshape(-1)[r0 * d:r1 * d], r0 * d, r1 * d, p.numel(), out)
            return [o if s is None else o.view(shape) for o, s in zip(out, self.slots)]
        # a row subset: z is defined over the trained rows gathered in order; the other rows are the master's
        # the row list lives on the host (units.resolve_rows): no device sync per block
        ka, kb = torch.searchsorted(ref.rows, torch.tensor([r0, r1], device=ref.rows.device)).tolist()
        rows = self._device_rows(ref, p.device)
        blocks = [o if s is None else o.view(shape).copy_(p[r0:r1]) for o, s in zip(out, self.slots)]
        if ka < kb:
            vals = [None if s is None else self.buffers.get(f"subset{i}", (kb - ka) * d, p.dtype, p.device)
                    for i, s in enumerate(self.slots)]
            self._perturb_range(ref, p[rows[ka:kb]].reshape(-1), ka * d, kb * d, rows.numel() * d, vals)
            for blk, v, s in zip(blocks, vals, self.slots):
                if s is not None:
                    blk[rows[ka:kb] - r0] = v.view(kb - ka, *p.shape[1:])
        return blocks

    def _device_rows(self, ref, device: torch.device) -> torch.Tensor:
        if ref.rows.device == device:
            return ref.rows
        cached = self._rows_on_device.get(id(ref))
        if cached is None or cached.device != device:
            cached = self._rows_on_device[id(ref)] = ref.rows.to(device)
        return cached

    def enter(self, unit: Unit) -> None:
        """Make the unit's parameters resident and apply their pending update (before any working copy is formed).
        If applying the update fails, the unit leaves residency at once, as changed (written back): what the update
        did apply is kept, and what it did not is still owed (optimizer.apply_pending notes each piece as its update
        runs)."""
        self.residency.enter(unit)
        try:
            dirty = bool(self.before_perturb(unit)) if self.before_perturb is not None else False
        except BaseException:
            self.residency.exit(unit, True)
            raise
        self._dirty[id(unit)] = dirty

    def acquire(self, unit: Unit) -> list[list[torch.Tensor]]:
        self.enter(unit)
        try:
            return self._copies(unit)
        except BaseException:
            # (out of memory for a copy buffer, say): the unit leaves residency as after a forward, so an update
            # `enter` applied is written back and its parameters point at their store again
            self.release(unit)
            raise

    def _copies(self, unit: Unit) -> list[list[torch.Tensor]]:
        """Every slot's working copies of an entered unit's parameters."""
        refs = unit.trainable
        if all(s is None for s in self.slots):
            return [[r.param.data for r in refs] for _ in self.slots]
        fused = self._copies_fused(refs)
        if fused is not None:
            return fused
        sizes: dict[tuple, int] = {}
        for ref in refs:
            k = (ref.param.device, ref.param.dtype)
            sizes[k] = sizes.get(k, 0) + ref.param.numel()
        # one flat buffer per slot, device and dtype, sized for the whole unit; each parameter's copy is a slice
        flats = {(i, *k): self.buffers.get(f"slot{i}", n, k[1], k[0])
                 for i, s in enumerate(self.slots) if s is not None for k, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        copies: list[list[torch.Tensor]] = [[] for _ in self.slots]
        # whole z chunks of every parameter, in order: (ref, its master values, z length, its copies, lo, hi)
        pieces = []
        for ref in refs:
            p = ref.param.data
            n, k = p.numel(), (p.device, p.dtype)
            off = offsets[k]
            offsets[k] = off + n
            outs = {i: flats[(i, *k)][off:off + n] for i, s in enumerate(self.slots) if s is not None}
            if ref.rows is not None:                 # only these rows move: z covers them, the rest is copied
                base = p[ref.rows].reshape(-1)
                for out in outs.values():
                    out.copy_(p.reshape(-1))
            else:
                base = p.reshape(-1)
            m = base.numel()
            # a piece per element-wise pass; a chunk for tied weights kept whole (their ε·z is cached per chunk)
            step = (self.generator.chunk if id(ref.param) in self.keep_whole
                    else self.generator.pass_elements(p.device))
            pieces += [(ref, base, m, outs, lo, min(lo + step, m)) for lo in range(0, m, step)]
            for i, slot in enumerate(self.slots):
                copies[i].append(p if slot is None else outs[i].view_as(p))
        kept = [pc for pc in pieces if id(pc[0].param) in self.keep_whole]
        pieces = [pc for pc in pieces if id(pc[0].param) not in self.keep_whole]
        for j in self._perturbations():
            for ref, base, m, outs, lo, hi in kept:      # tied_z_cache: drawn by whichever unit comes first
                self._form(ref, base, outs, j, lo, hi, self._kept_z(ref, j, lo // self.generator.chunk, m))
            left = self._form_fused(pieces, j)
            for group in self._groups(left):
                # z_j for a group of chunks drawn at once (in parallel on CPU): the scratch is that group, not a copy
                # of the largest parameter
                total = sum(hi - lo for _, _, _, _, lo, hi in group)
                z = self._span_z(group[0][0].param.device, total)
                requests, at = [], 0
                for ref, _, m, _, lo, hi in group:
                    requests.append((z[at:at + hi - lo], self.seed, j, self.keys[id(ref.param)], m, lo))
                    at += hi - lo
                # ε·z straight from the sampler: θ ± (εz), rounded as the plain expression `p + eps * z` rounds
                self.generator.fill_many(requests, scale=self.eps)
                at = 0
                for ref, base, _, outs, lo, hi in group:
                    self._form(ref, base, outs, j, lo, hi, z[at:at + hi - lo])
                    at += hi - lo
        return copies

    def _copies_fused(self, refs) -> Optional[list[list[torch.Tensor]]]:
        """`_copies` for a unit whose parameters all take the fused Triton kernel whole (one device and dtype,
        contiguous, not row subsets nor kept whole: the GPUs' decoder layers): one launch per perturbation from a
        layout kept per unit, slots and addresses, so that a step pays only its keys, not the general path's
        per-piece cutting, checks and table rows (on CPU 197 against 744 µs per OPT-shaped layer, kernels stood in:
        docs/performance.md). None where it does not apply. The values are the general path's bit for bit (z is
        counter-based: any cut gives the same)."""
        if not refs:
            return None
        masters = [r.param.data for r in refs]
        p0 = masters[0]
        if not (self.generator.fuses(p0.device, p0.dtype) and self.generator.counter_based(p0.device)):
            return None
        from .. import triton_passes
        key = (tuple(id(r) for r in refs), tuple(self.slots), triton_passes.address_key(masters))
        layout = triton_passes.kept_layout(self._fused_layouts, key, lambda: self._fused_layout(refs, masters))
        if layout is False:
            return None
        launches, base, key_ids, n = layout
        gaussian = self.generator.distribution == "gaussian"
        flats = {i: self.buffers.get(f"slot{i}", n, p0.dtype, p0.device)
                 for i, slot in enumerate(self.slots) if slot is not None}
        master0 = masters[base].view(-1)
        for j in self._perturbations():
            targets = self._targets(j)
            keys = [slice_key(self.seed, j, k) for k in key_ids]
            self.generator.elements_drawn += launches.run(keys, master0, [flats[i] for i, _ in targets],
                                                          [sign for _, sign in targets], self.eps, gaussian)
        # each copy a view of its place in the flat buffer, made in one call (a view apiece is 3x the host time;
        # views are not kept: the buffers are freed at every step's embedding and output layer, drop_whole_copies)
        return [list(masters) if slot is None else list(_unflatten_dense_tensors(flats[i], masters))
                for i, slot in enumerate(self.slots)]

    def _fused_layout(self, refs, masters: list[torch.Tensor]):
        """_copies_fused's layout of these parameters: the launches (each copy at its place in the slot's flat
        buffer, as `_copies` lays it out), the base master, the keys and the buffer's length; False where the unit
        does not qualify."""
        from .. import triton_passes
        p0 = masters[0]
        if (any(r.rows is not None or id(r.param) in self.keep_whole for r in refs)
                or any(m.device != p0.device or m.dtype != p0.dtype or not m.is_contiguous() for m in masters)
                or any(len(self._targets(j)) > 2 for j in self._perturbations())):
            return False
        base, offs = triton_passes.offsets(masters)
        rows, at = [], 0
        for off, m in zip(offs, masters):
            rows.append((off, at, m.numel(), 0))
            at += m.numel()
        return triton_passes.PerturbLaunches(rows), base, [self.keys[id(r.param)] for r in refs], at

    def _form_fused(self, pieces: list, j: int) -> list:
        """Perturbation j's copies of these pieces in one native sweep per z chunk (CPU, float32) or one Triton launch
        (counter-based z, any device: triton_passes) where it applies (not row subsets); returns the pieces left for
        the drawn-chunk path."""
        if not pieces:
            return pieces
        kinds = {(pc[0].param.device, pc[0].param.dtype) for pc in pieces}
        if all(d.type != "cpu" and not self.generator.fuses(d, t) for d, t in kinds):
            return pieces      # no host work added where every op is a launch and nothing fuses
        signs = self._targets(j)
        cands = [pc for pc in pieces if pc[0].rows is None]
        jobs = [(base[lo:hi], self.seed, j, self.keys[id(ref.param)], m, lo,
                 [(outs[i][lo:hi], sign) for i, sign in signs]) for ref, base, m, outs, lo, hi in cands]
        left = {id(job) for job in self.generator.perturb_fused(jobs, self.eps)}
        done = {id(pc) for pc, job in zip(cands, jobs) if id(job) not in left}
        return [pc for pc in pieces if id(pc) not in done]

    def _span_z(self, device: torch.device, n: int) -> torch.Tensor:
        """n (at most a span) float32 elements of scratch for ε·z: the generator's span scratch of this stream, which
        the update uses too, always before or after (`enter` applies it before any copy is formed)."""
        z = self.generator.span_scratch(device)[0]
        if n > z.numel():
            raise RuntimeError(f"{n} z elements at once, more than a span ({z.numel()})")
        return z[:n]

    def _groups(self, pieces: list) -> list[list]:
        """Consecutive pieces on one device, in groups of at most one span (a larger piece stands alone)."""
        groups = []
        for device, run in itertools.groupby(pieces, key=lambda piece: piece[0].param.device):
            run = list(run)
            groups += span_groups(run, [hi - lo for *_, lo, hi in run], self.generator.span(device))
        return groups

    def _form(self, ref, base: torch.Tensor, outs: dict, j: int, lo: int, hi: int, ez: torch.Tensor) -> None:
        """Elements [lo, hi) of the copies of perturbation j's slots: master ± ε·z, in float32, rounded once."""
        p = ref.param.data
        master = base[lo:hi]
        for i, slot in enumerate(self.slots):
            if slot is None or slot[0] != j:
                continue
            if ref.rows is not None:
                gathered = outs[i].view_as(p)[ref.rows].view(-1)   # (a copy: written back below)
                _shifted(master, ez, slot[1], gathered[lo:hi])
                outs[i].view_as(p)[ref.rows] = gathered.view(-1, *p.shape[1:])
            else:
                _shifted(master, ez, slot[1], outs[i][lo:hi])

    def repoints(self, unit: Unit) -> bool:
        return self.residency.repoints(unit)

    def release(self, unit: Unit) -> None:
        # the copy buffers are reused by the next unit: safe, since it computes after this one on the same stream
        self.residency.exit(unit, self._dirty.pop(id(unit), False))
