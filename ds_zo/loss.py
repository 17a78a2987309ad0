"""The causal-LM loss: mean token cross-entropy over shifted labels != -100 (HF's definition), accumulated in float64.

Each part (micro-batch, rank, sign) returns (sum of its token losses in float64, token count); parts combine in
float64, so the loss does not depend on how the global batch is cut into micro-batches and ranks. A position's loss
is taken from its logits a vocabulary window at a time (TokenCrossEntropy): that is what lets the streamed output
layer hand its logits over block by block and never hold them (StreamedTokenLoss). HF's own `.loss` reduces the mean
in float32 (off by an ulp, ~1e-7 of L, which 1/2ε magnifies in g = (L+ − L−)/2ε): ds_zo does not use it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def default_labels(batch: dict) -> torch.Tensor:
    """labels if given, else input_ids with padding (attention_mask == 0) ignored, as HF's LM collators do."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


# Logits per reduction tile (positions × vocabulary window; a float32 tile and its log-softmax are the scratch): 1 MB
# on CPU, where the tile should stay in cache; 32 MB elsewhere, where fewer, larger kernels matter more: a host-bound
# GPU step pays per launch, and a tile is 9 host-issued ops (ds_zo.perfmodel.LOSS_OPS_PER_TILE; 19 µs each on the
# H200 machine's host). 2 × 2048 positions of OPT's 50272-token vocabulary take 28 tiles (112 with 8 MB tiles,
# which were 10 % of an OPT-1.3B step at 1 × 2048 tokens and 29 % at 4 × 2048 by the model: tenth pass). The tile
# scratch is one per loss, shared by its slots (reduced one after another on one stream).
CPU_TILE_ELEMENTS = 1 << 18
DEVICE_TILE_ELEMENTS = 1 << 23
# Columns per vocabulary window. Fixed per device, so a position's loss does not depend on whether its logits arrive
# whole or block by block from a streamed output layer, whose window buffers hold positions × window logits per slot.
# Elsewhere than on CPU the windows are narrower than a large vocabulary for that (row blocks on GPUs too), and
# the tiles about as many as with whole-vocabulary windows (the 28 tiles of 1024 positions × 8192 columns above,
# against 26 of 166 positions × 50272).
CPU_VOCAB_WINDOW = 2048
DEVICE_VOCAB_WINDOW = 8192


def loss_tiling(device: torch.device, vocab: int) -> tuple[int, int]:
    """(vocabulary columns per window, positions per reduction tile) for logits on `device`."""
    cpu = torch.device(device).type == "cpu"
    window = max(1, min(vocab, CPU_VOCAB_WINDOW if cpu else DEVICE_VOCAB_WINDOW))
    return window, max(1, (CPU_TILE_ELEMENTS if cpu else DEVICE_TILE_ELEMENTS) // window)


def shifted_targets(labels: torch.Tensor, device) -> torch.Tensor:
    """Per position (rows × length, row-major), the token it predicts: labels[i+1]; the last position predicts none."""
    return F.pad(labels[:, 1:].to(device), (0, 1), value=IGNORE_INDEX).reshape(-1)


class TokenCrossEntropy:
    """Per-position cross-entropy log Σ exp(x) − x_target of one part's logits, fed a tile (positions × vocabulary
    window) at a time, every position's windows in column order, so the logits never need to exist whole.

    A tile's float32 log-softmax (torch's fused kernel, as in HF's cross-entropy) gives its window's log-sum-exp as
    max(x) − max(log softmax(x)): the max is exact and the second term is −log Σ exp(x − max), a small number, so
    the window's value is as exact as HF's per-token loss however large the logits. Windows combine as a running
    log-sum-exp in float64, the target logits come separately (add_targets) and the difference is taken in float64:
    the loss is HF's definition to float32 rounding (g on the tiny test models 2e-6 to 3e-5 relative from a float64
    cross-entropy's, HF's own 5e-6 to 8e-5). The same logits give the same value bit for bit whoever feeds them
    (whole logits in token_loss_sum, blocks in StreamedTokenLoss): the tiles are fixed by loss_tiling and always
    reduced as contiguous float32 tensors. (A float64 log-softmax is exact to ~1e-15 but took 2.2 ns per logit
    against 0.6: 3 % of a SmolLM2 step at 16 × 64 tokens, measured side by side.)"""

    def __init__(self, targets: torch.Tensor, vocab: int, scratch: Optional[dict] = None):
        n, device = targets.numel(), targets.device
        self.targets = targets
        self.vocab = vocab
        self._lse = torch.empty(n, dtype=torch.float64, device=device)
        self._target = torch.zeros(n, dtype=torch.float64, device=device)
        # the float32 tile, made on first use (float32 contiguous parts never need it); `scratch` shares it with
        # the other parts of one loss, which are reduced one after another
        self._scratch = {} if scratch is None else scratch
        self._seen = 0

    def add(self, a: int, c0: int, part: torch.Tensor) -> None:
        """The logits of positions [a, a + n) and columns [c0, c0 + w), as an (n, w) tensor (read only)."""
        n, w = part.shape
        if part.dtype == torch.float32 and part.is_contiguous():
            tile = part
        else:
            buf = self._scratch.get("tile")
            if buf is None:
                window, positions = loss_tiling(part.device, self.vocab)
                buf = self._scratch["tile"] = part.new_empty(min(self.targets.numel(), positions) * window,
                                                             dtype=torch.float32)
            tile = buf[:n * w].view(n, w)
            tile.copy_(part)
        window = tile.amax(1).double() - F.log_softmax(tile, 1).amax(1).double()
        if c0 == 0:
            self._lse[a:a + n] = window
        else:
            self._lse[a:a + n] = torch.logaddexp(self._lse[a:a + n], window)
        self._seen += n * w

    def add_targets(self, c0: int, logits: torch.Tensor) -> None:
        """Every position's logits for columns [c0, c0 + w) (a (positions, w) tensor): the targets among them."""
        w = logits.shape[1]
        t = self.targets - c0
        picked = logits.gather(1, t.clamp(0, w - 1).unsqueeze(1)).squeeze(1).double()
        self._target += torch.where((t >= 0) & (t < w), picked, 0.0)   # no host synchronisation

    @property
    def complete(self) -> bool:
        return self._seen == self.targets.numel() * self.vocab

    def per_token(self) -> torch.Tensor:
        """float64 losses; 0 where the target is IGNORE_INDEX."""
        if not self.complete:
            raise RuntimeError(f"cross-entropy of {self.targets.numel()} positions × {self.vocab} columns has seen "
                               f"{self._seen} logits")
        return (self._lse - self._target).masked_fill(self.targets == IGNORE_INDEX, 0.0)


def _summed(per_token: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[float, int]:
    rows, length = labels.shape
    # the last position of each row predicts nothing: positions [0, T-1) summed in row order
    shifted = per_token.view(rows, length)[:, :-1]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    # a target outside the vocabulary matches no logit: its loss would be log Σ exp(x) alone, silently (HF raises)
    count, outside = torch.stack([scored.sum(), (scored & ((targets < 0) | (targets >= vocab))).sum()]).tolist()
    if outside:
        bad = targets[scored & ((targets < 0) | (targets >= vocab))]
        raise IndexError(f"labels: {outside} target(s) outside the vocabulary [0, {vocab}) and not {IGNORE_INDEX} "
                         f"(the ignore index), e.g. {bad[:5].tolist()}")
    return float(shifted.reshape(-1).sum()), count


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(sum of the part's token cross-entropies in float64, number of target tokens); position i predicts labels[i+1].
    The logits are read a tile at a time, so the scratch is one tile (see TokenCrossEntropy)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    ce = TokenCrossEntropy(shifted_targets(labels, logits.device), vocab)
    ce.add_targets(0, flat)
    window, positions = loss_tiling(logits.device, vocab)
    for a in range(0, flat.shape[0], positions):
        for c0 in range(0, vocab, window):
            ce.add(a, c0, flat[a:a + positions, c0:c0 + window])
    return _summed(ce.per_token(), labels, vocab)


class StreamedTokenLoss:
    """Every slot's token losses taken straight from a streamed output layer (model/streamed.py) as it computes
    blocks of output features, so no slot's logits are ever held whole: each block's matmul writes into a window
    buffer of the slot's (positions × window), which is reduced when full. The layer returns `placeholder` (a meta
    tensor of the logits' shape) instead of logits; the engine uses these losses only if the model returned that
    very tensor as its logits, i.e. did nothing to the output layer's output."""

    def __init__(self, labels: torch.Tensor, slots: int, vocab: int, device: torch.device):
        self.labels = labels
        targets = shifted_targets(labels, device)
        scratch: dict = {}
        self.parts = [TokenCrossEntropy(targets, vocab, scratch) for _ in range(slots)]
        self.window, self.positions = loss_tiling(device, vocab)
        self.vocab = vocab
        self.placeholder = torch.empty(slots * labels.shape[0], labels.shape[1], vocab, device="meta")
        self._buf: list[Optional[torch.Tensor]] = [None] * slots
        self._columns = [0] * slots
        self.started = False

    def add_matmul(self, slot: int, c0: int, x: torch.Tensor, weight: torch.Tensor) -> None:
        """The slot's logits x · weightᵀ for output features [c0, c0 + weight.shape[0]); x is (..., in_features) with
        every position of the slot; blocks in order. Each piece of the block inside one window is one matmul written
        straight into the window (a block starts at a multiple of 64 rows and a window at a multiple of 2048: on CPU
        the pieces round like the whole block, see model/streamed.py)."""
        self.started = True
        if c0 != self._columns[slot]:
            raise RuntimeError(f"output-layer block at column {c0}, expected {self._columns[slot]}")
        ce = self.parts[slot]
        n = ce.targets.numel()
        x = x.reshape(n, x.shape[-1])
        if self._buf[slot] is None:
            self._buf[slot] = x.new_empty(n * self.window)
        # under autocast (ds_config's torch_autocast) the whole layer's F.linear would multiply in the autocast dtype:
        # so do the blocks (torch.mm with out= is not autocast), then their logits are written into the window
        cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if cast is not None:
            x, weight = x.to(cast), weight.to(cast)
        done, rows = 0, weight.shape[0]
        while done < rows:
            col = c0 + done
            w0 = col // self.window * self.window
            width = min(self.window, self.vocab - w0)
            take = min(rows - done, w0 + width - col)
            win = self._buf[slot][:n * width].view(n, width)
            piece = win[:, col - w0:col - w0 + take]
            if cast is None:
                torch.mm(x, weight[done:done + take].t(), out=piece)
            else:
                piece.copy_(torch.mm(x, weight[done:done + take].t()))
            ce.add_targets(col, piece)
            done += take
            if col + take == w0 + width:                 # window full: reduce it a tile of positions at a time
                for a in range(0, n, self.positions):
                    ce.add(a, w0, win[a:a + self.positions])
        self._columns[slot] = c0 + rows

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)

    def results(self) -> list[tuple[float, int]]:
        return [_summed(p.per_token(), self.labels, self.vocab) for p in self.parts]


def mean_loss(parts: Sequence[tuple[float, int]]) -> float:
    """The token mean over all parts (float64)."""
    total = sum(c for _, c in parts)
    if total == 0:
        raise ValueError("no target tokens in the batch (every label is -100)")
    return sum(s for s, _ in parts) / total


class LabelWordLoss:
    """Prompt-classification loss (MeZO's): cross-entropy over the candidate label words only, at the position before
    each row's label word. Unlike the full-vocabulary token loss it is discriminative: it moves the gold word up
    relative to the other label words, not all label words up relative to the rest of the vocabulary."""

    def __init__(self, candidate_ids):
        self.candidate_ids = list(candidate_ids)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        from .data.tasks import candidate_scores
        scores, gold = candidate_scores(logits, labels.to(logits.device), self.candidate_ids)
        per_row = F.cross_entropy(scores.float(), gold, reduction="none")
        return float(per_row.double().sum()), int(gold.numel())
