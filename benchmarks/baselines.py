"""The baselines ds_zo is compared with, written from the published algorithms (no ds_zo code inside).

- `MeZOLoop`: MeZO's SPSA step as its reference trainer does it (Malladi et al. 2023, Algorithm 1): one seed per
  step; z is regenerated from `torch.manual_seed(seed)` parameter by parameter, in `named_parameters()` order, every
  time it is needed; the parameters are perturbed *in place* by +εz, forward, −2εz, forward, +εz (back to θ), then z
  is drawn a fourth time for the update θ ← θ − lr·(g·z + wd·θ). So z is drawn 4 times per element per step and the
  model is never copied. Two styles:
    * "inplace" (default, the stronger baseline): `p.add_(z, alpha=s·ε)`, one fused pass per perturbation;
    * "published": MeZO's expressions `p.data = p.data + s * z * ε` (three temporaries per parameter per pass).
- `AdamWStep`: a first-order step (forward, backward, torch.optim.AdamW).
- `InferenceForward`: one forward under `torch.no_grad()` of the same batch (the memory floor ZO aims at).

The loss of every baseline is HF's own `.loss` (MeZO's), computed by the model from the `labels` of the batch.
"""
from __future__ import annotations

from typing import Optional

import torch


def decays(param: torch.Tensor) -> bool:
    """Weight decay on matrices and embeddings only (the rule ds_zo uses; MeZO matches names, same effect)."""
    return param.dim() >= 2


class MeZOLoop:
    """MeZO's in-place SPSA step. `step(batch)` returns (loss at θ+εz, projected gradient g), like MeZO's zo_step."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, style: str = "inplace"):
        if style not in ("inplace", "published"):
            raise ValueError(f"style {style!r}")
        self.model = model.eval()
        self.lr, self.eps, self.wd, self.style = lr, eps, weight_decay, style
        # named_parameters() de-duplicates a tied weight: it is perturbed and updated once, as in MeZO
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.rng = torch.Generator().manual_seed(seed)   # draws the per-step seeds (MeZO: np.random.randint)
        self.elements_drawn = 0
        self.projected_grad: Optional[float] = None
        self.step_seed: Optional[int] = None

    def _z(self, p: torch.Tensor) -> torch.Tensor:
        self.elements_drawn += p.numel()
        return torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def perturb(self, scale: float) -> None:
        torch.manual_seed(self.step_seed)
        for _, p in self.params:
            z = self._z(p)
            if self.style == "inplace":
                p.data.add_(z, alpha=scale * self.eps)
            else:
                p.data = p.data + scale * z * self.eps

    @torch.no_grad()
    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss.detach()

    @torch.no_grad()
    def update(self) -> None:
        torch.manual_seed(self.step_seed)
        g, lr = self.projected_grad, self.lr
        for _, p in self.params:
            z = self._z(p)
            if self.style == "inplace":
                if self.wd and decays(p):
                    p.data.mul_(1 - lr * self.wd)
                p.data.add_(z, alpha=-lr * g)
            elif self.wd and decays(p):
                p.data = p.data - lr * (g * z + self.wd * p.data)
            else:
                p.data = p.data - lr * (g * z)

    def step(self, batch: dict) -> tuple[float, float]:
        self.step_seed = int(torch.randint(0, 1_000_000_000, (1,), generator=self.rng))
        self.perturb(+1)
        loss_plus = self.loss(batch)
        self.perturb(-2)
        loss_minus = self.loss(batch)
        self.projected_grad = float((loss_plus - loss_minus) / (2 * self.eps))
        self.perturb(+1)
        self.update()
        return float(loss_plus), self.projected_grad


class AdamWStep:
    """One first-order step: forward with loss, backward, AdamW update (optimizer state created on the first step)."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-5, weight_decay: float = 0.0):
        self.model = model.eval()   # no dropout, like the ZO steps
        for p in model.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, batch: dict) -> float:
        loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class InferenceForward:
    """One forward of the batch, no autograd: logits and HF's loss, nothing kept. with_loss=False: the logits alone
    (no labels passed), the leanest forward a user could compare with."""

    def __init__(self, model: torch.nn.Module, with_loss: bool = True):
        self.model = model.eval()
        self.with_loss = with_loss

    @torch.no_grad()
    def step(self, batch: dict) -> float:
        if self.with_loss:
            return float(self.model(**batch, use_cache=False).loss)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return float(self.model(**inputs, use_cache=False).logits[0, -1, 0])


def make_batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict:
    """Random token ids, no padding, labels = input ids (causal LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def zo_config(rows: int, lr: float = 1e-6, eps: float = 1e-3, **zero_order) -> dict:
    """A ds_config for ds_zo with one micro-batch of `rows` rows."""
    return {"train_micro_batch_size_per_gpu": rows, "steps_per_print": 10**9,
            "optimizer": {"type": "ZOSGD", "params": {"lr": lr, "eps": eps, "weight_decay": 0.0}},
            "zero_order": {"seed": 0, **zero_order}}
