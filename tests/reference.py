"""A plain, obviously-correct MeZO loop: the reference that ds_zo must match.

Two separate HF forwards at θ+εz and θ−εz built with torch.func.functional_call (loss: ds_zo's token loss of those
logits, the mean of per-token cross-entropies in float64, which tests/test_loss.py holds against a float64
cross-entropy and HF's own; `token_loss` swaps in another), z drawn with ds_zo's slice-addressable generator over each
whole parameter, then θ ← θ − lr·(g·z + wd·θ) (no decay for 1-D)."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call

from ds_zo.loss import token_loss_sum
from ds_zo.perturb import PerturbationGenerator, param_key, step_seed


class MeZOReference:
    def __init__(self, model, lr, eps, wd=0.0, seed=0, q=1, distribution="gaussian", trainable=None, rows=None,
                 token_loss=None, sampler="auto"):
        self.token_loss = token_loss or token_loss_sum     # (logits, labels) -> (loss sum, count)
        self.model = copy.deepcopy(model).eval()
        self.lr, self.eps, self.wd, self.seed, self.q = lr, eps, wd, seed, q
        self.gen = PerturbationGenerator(distribution, sampler=sampler)
        names = [n for n, _ in self.model.named_parameters()]
        self.trainable = names if trainable is None else [n for n in names if n in trainable]
        self.rows = rows or {}       # name -> rows: only those rows are perturbed and updated
        if rows:
            self.trainable = [n for n in names if n in rows or (trainable is not None and n in trainable)]
        self.step_count = 0

    def params(self) -> dict:
        return dict(self.model.named_parameters())

    def z(self, seed, j, name):
        """z as a full-shaped tensor (zero outside the trained rows of a row subset)."""
        p = self.params()[name]
        if name not in self.rows:
            return self.gen.z(seed, j, param_key(name), p.numel(), device=p.device).view_as(p)
        r = self.rows[name]
        out = torch.zeros_like(p)
        out[r] = self.gen.z(seed, j, param_key(name), len(r) * p[0].numel(), device=p.device).view(len(r),
                                                                                                  *p.shape[1:])
        return out

    @torch.no_grad()
    def loss(self, batch, shifts=None) -> float:
        params = {n: p + shifts[n] if shifts and n in shifts else p for n, p in self.params().items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = functional_call(self.model, params, args=(), kwargs=dict(inputs, use_cache=False)).logits
        total, count = self.token_loss(logits, batch["labels"])
        return total / count

    @torch.no_grad()
    def hf_loss(self, batch) -> float:
        return self.model(**batch, use_cache=False).loss.item()

    @torch.no_grad()
    def step(self, batch):
        seed = step_seed(self.seed, self.step_count)
        grads, losses = [], []
        zs = [{n: self.z(seed, j, n) for n in self.trainable} for j in range(self.q)]
        for j in range(self.q):
            lp = self.loss(batch, {n: self.eps * z for n, z in zs[j].items()})
            lm = self.loss(batch, {n: -self.eps * z for n, z in zs[j].items()})
            grads.append((lp - lm) / (2 * self.eps))
            losses.append((lp + lm) / 2)
        params = self.params()
        for n in self.trainable:
            p = params[n]
            upd = sum(g * zs[j][n] for j, g in enumerate(grads)) / self.q
            if n in self.rows:                      # rows only: the others take neither the step nor decay
                r = self.rows[n]
                upd = upd[r] + (self.wd * p[r] if p.dim() >= 2 else 0)
                p[r] = p[r] - self.lr * upd
                continue
            if p.dim() >= 2:
                upd = upd + self.wd * p
            p.sub_(self.lr * upd)
        self.step_count += 1
        return sum(losses) / self.q, grads
