"""ZOEngine: a DeepSpeedEngine that trains with zeroth-order SPSA steps instead of backward passes.

DeepSpeed keeps what it is good at (distributed init, config, dtype casting, lr schedulers, counters, monitors,
dataloaders, checkpoint layout); ds_zo replaces the training step: `train_batch` runs one doubled-batch forward per
perturbation (units see θ+εz on the first half, θ−εz on the second), turns the two losses into the projected gradient
g = (L+ − L−) / 2ε, and hands (seed, g, lr) to ZOSGD, whose update is applied at once or fused into the next forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from .config import ZeroOrderConfig, ZOSGDParams
from .loss import default_labels, mean_loss, token_loss_sum
from .model.dual_forward import dual_forward
from .model.perturbed_copies import PerturbedCopies
from .model.units import Unit, cut_into_units
from .optimizer import ZOSGD
from .perturb import PerturbationGenerator, param_key, step_seed

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Dropout off for both signs (as MeZO runs the model in eval mode); the caller's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ZOEngine(DeepSpeedEngine):
    def __init__(self, *args, zo_config: ZeroOrderConfig, zo_params: ZOSGDParams, trainable: set[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.zo_config = zo_config
        self.eps = zo_params.eps
        self.weight_decay = zo_params.weight_decay
        self.trainable_names = trainable
        self.units: list[Unit] = cut_into_units(self.module, trainable)
        self.param_keys = {id(p): param_key(n) for n, p in self.module.named_parameters() if n in trainable}
        self.perturbations = PerturbationGenerator(zo_config.distribution)
        self.optimizer.attach(self.perturbations, self.param_keys)
        self.copies = PerturbedCopies(self.perturbations, self.param_keys, self.eps,
                                      before_perturb=self._apply_pending_to_unit)
        self.last_projected_grad: Optional[float | list[float]] = None
        self._in_zo_forward = False
        self._data_iterator: Optional[Iterator] = None
        # Make a pending update visible to anyone who runs or reads the model directly (hooks on this model only).
        self._hooks = [self.module.register_forward_pre_hook(lambda *_: self._flush_unless_stepping()),
                       self.module.register_state_dict_pre_hook(lambda *_: self._flush_unless_stepping())]

    # DeepSpeed would wrap the optimizer for bf16/fp16/ZeRO: those wrappers exist to manage gradients, which ZO has none
    # of, so the ZO optimizer is used as is.
    def _configure_optimizer(self, client_optimizer, model_parameters):
        if not isinstance(client_optimizer, ZOSGD):
            raise TypeError(f"ZOEngine needs a ZOSGD optimizer, got {type(client_optimizer).__name__}")
        self.basic_optimizer = self.optimizer = client_optimizer

    # -- the pending update ---------------------------------------------------------------------------------------
    def _apply_pending_to_unit(self, refs) -> None:
        self.optimizer.apply_pending(r.param for r in refs)

    def _flush_unless_stepping(self) -> None:
        if not self._in_zo_forward:
            self.optimizer.flush()

    def flush(self) -> None:
        """Apply any pending (fused) update so the stored parameters include every completed step."""
        self.optimizer.flush()

    # -- batches ----------------------------------------------------------------------------------------------------
    def _to_device(self, batch) -> dict:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("a batch must be a dict with at least 'input_ids' (and optionally attention_mask, labels)")
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _micro_batches(self, batch, data_iter) -> list[dict]:
        """The micro-batches of this rank's share of one global batch. A given batch is split into micro-batches of
        train_micro_batch_size_per_gpu rows (memory only: the loss is the exact token mean over all rows); otherwise
        gradient_accumulation_steps micro-batches are drawn from data_iter or the engine's dataloader."""
        if batch is not None:
            batch = self._to_device(batch)
            rows = batch["input_ids"].shape[0]
            mb = self.train_micro_batch_size_per_gpu() or rows
            return [{k: (v[i:i + mb] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
                     for k, v in batch.items()} for i in range(0, rows, mb)]
        if data_iter is None:
            if self.training_dataloader is None:
                raise ValueError("train_batch needs a batch, a data_iter, or training_data given to ds_zo.initialize")
            if self._data_iterator is None:
                self._data_iterator = iter(self.training_dataloader)
            data_iter = self._data_iterator
        return [self._to_device(next(data_iter)) for _ in range(self.gradient_accumulation_steps())]

    @staticmethod
    def _model_inputs(batch: dict, copies: int) -> dict:
        rows = batch["input_ids"].shape[0]
        out = {}
        for k in MODEL_INPUT_KEYS:
            v = batch.get(k)
            if v is not None:
                out[k] = torch.cat([v] * copies) if copies > 1 and v.shape[0] == rows else v
        return out

    # -- forwards ---------------------------------------------------------------------------------------------------
    def _signed_losses(self, batch: dict, signs=(1, -1)) -> list[tuple[float, int]]:
        """One model forward over len(signs) copies of the batch; per sign, (token loss sum, token count)."""
        rows = batch["input_ids"].shape[0]
        labels = default_labels(batch)
        self._in_zo_forward = True
        try:
            with _eval_mode(self.module), torch.no_grad(), dual_forward(self.units, signs, rows, self.copies):
                logits = self.module(**self._model_inputs(batch, len(signs)), use_cache=False).logits
        finally:
            self._in_zo_forward = False
        out = []
        for i in range(len(signs)):
            out.append(token_loss_sum(logits[i * rows:(i + 1) * rows], labels))
        return out

    def train_batch(self, batch: Optional[dict] = None, data_iter: Optional[Iterator] = None) -> float:
        """One ZO step over this rank's share of a global batch; returns (L+ + L−)/2 (mean over perturbations)."""
        micro = self._micro_batches(batch, data_iter)
        step = self.global_steps
        seed = step_seed(self.zo_config.seed, step)
        lr = self.optimizer.current_lr()
        q = self.zo_config.num_perturbations
        grads, losses = [], []
        for j in range(q):
            self.copies.set_perturbation(seed, j)
            plus, minus = [], []
            for mb in micro:
                p, m = self._signed_losses(mb)
                plus.append(p)
                minus.append(m)
            # units that did not run in the forward still owe the previous step's update
            self.optimizer.flush()
            l_plus, l_minus = mean_loss(plus), mean_loss(minus)
            grads.append((l_plus - l_minus) / (2 * self.eps))
            losses.append((l_plus + l_minus) / 2)
        self.optimizer.record_step(step, seed, grads, lr, self.weight_decay)
        if not self.zo_config.fuse_update:
            self.optimizer.flush()
        self._take_model_step(None)  # DeepSpeed's bookkeeping: lr scheduler, global_steps, global_samples
        self.last_projected_grad = grads[0] if q == 1 else grads
        loss = sum(losses) / q
        self._write_monitor(loss, grads, lr)
        return loss

    def eval_batch(self, batch: dict) -> float:
        """The mean token loss at the current parameters (every completed step applied)."""
        self.flush()
        batch = self._to_device(batch)
        with _eval_mode(self.module), torch.no_grad():
            logits = self.module(**self._model_inputs(batch, 1), use_cache=False).logits
        return mean_loss([token_loss_sum(logits, default_labels(batch))])

    def _write_monitor(self, loss: float, grads: list[float], lr: float) -> None:
        if self.monitor.enabled and self.global_rank == 0:
            x = self.global_samples
            events = [("Train/Samples/train_loss", loss, x), ("Train/Samples/lr", lr, x)]
            events += [(f"Train/Samples/projected_grad{'' if len(grads) == 1 else f'_{j}'}", g, x)
                       for j, g in enumerate(grads)]
            self.monitor.write_events(events)

    # -- state ------------------------------------------------------------------------------------------------------
    def module_state_dict(self, *args, **kwargs):
        self.flush()
        return super().module_state_dict(*args, **kwargs)

    @property
    def step_log(self):
        return self.optimizer.step_log

    def save_checkpoint(self, *args, **kwargs):
        self.flush()
        return super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        self.flush()
        return super().load_checkpoint(*args, **kwargs)
