"""ZOEngine: a DeepSpeedEngine that trains with zeroth-order SPSA steps instead of backward passes.

DeepSpeed keeps what it is good at (distributed init, config, dtype casting, lr schedulers, counters, monitors,
dataloaders, checkpoint layout); ds_zo replaces the training step: `train_batch` runs one forward over the batch
replicated once per slot (θ+εz_j and θ−εz_j for each perturbation j), turns the losses into projected gradients
g_j = (L+ − L−) / 2ε, and hands (seed, g, lr) to ZOSGD, whose update is applied at once or fused into the next forward.
With parameter offload, units stream through the ZO2 pipeline (ds_zo/offload) during every forward.
"""
from __future__ import annotations

import collections.abc
import contextlib
import inspect
import math
from collections import Counter
from typing import Iterator, Optional

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import logger

from .forward_context import eval_mode, forward_autocast
from .config import OffloadConfig, ZeroOrderConfig, ZOSGDParams
from .loss import IGNORE_INDEX, StreamedTokenLoss, default_labels, mean_loss, token_loss_sum
from .model.dual_forward import dual_forward
from .model.perturbed_copies import OUTPUT_ROLE, PerturbedCopies
from .model.streamed import streamed_kind
from .model.units import Unit, cut_into_units, full_numel
from .model_hooks import ModelHook, UnitHook, placeholder_guard, wrap_hook
from .offload import OffloadPipeline
from .offload.build import build_pipeline
from .offload.sharded import ShardedOffloadPipeline, ShardedUnit
from .optimizer import ZOSGD
from .parallel import Communicator, ParallelDims
from .perturb import PerturbationGenerator, accelerator_span_chunks, param_key, step_seed, z_stream

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")
MAX_KEPT_POSITIONS = 8


class NonFiniteLossError(RuntimeError):
    pass


def agree_on_z_stream(comm: Communicator, mine: str) -> str:
    """Every rank must draw the same z (perturbation parallelism splits one perturbation's signs over ranks, data
    parallelism averages one g): refuse to start when their samplers differ (e.g. GPUs with other SM counts)."""
    streams = comm.gather_strings(mine)
    if len(set(streams)) > 1:
        listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(streams))
        raise ValueError(f"ranks would draw different perturbations z ({listed}): torch's chunked CUDA sampler "
                         "depends on the GPU's multiprocessor count and the counter-based one on its compute "
                         "capability, and the counter-based one needs Triton on every rank: every rank of a ds_zo run "
                         "needs the same GPU model (and MIG profile) and software, or zero_order.z_sampler set alike")
    return mine


class ZOEngine(DeepSpeedEngine):
    def __init__(self, *args, zo_config: ZeroOrderConfig, zo_params: ZOSGDParams, trainable: set[str],
                 offload: OffloadConfig, dims: ParallelDims, communicator: Communicator,
                 rows: Optional[dict[str, torch.Tensor]] = None, loss_fn=None, **kwargs):
        try:
            # With offload the model must stay in host memory: DeepSpeed would move all of it to the device.
            super().__init__(*args, dont_change_device=offload.enabled, **kwargs)
            self._init_zo(zo_config, zo_params, trainable, offload, dims, communicator, rows, loss_fn)
        except BaseException:
            self._remove_hooks()    # DeepSpeed's (registered early in its __init__): they would keep this
            raise                   # half-built engine on the model

    def _init_zo(self, zo_config: ZeroOrderConfig, zo_params: ZOSGDParams, trainable: set[str],
                 offload: OffloadConfig, dims: ParallelDims, communicator: Communicator,
                 rows: Optional[dict[str, torch.Tensor]], loss_fn) -> None:
        self.zo_config = zo_config
        # DeepSpeed makes a GradScaler for fp16 torch_autocast at stage 0, and its _take_model_step (which train_batch
        # calls for the lr schedule and step count) would step it: there are no gradients to scale
        self.torch_autocast_z0_gradscaler = None
        # (logits, labels) -> (float64 sum of per-item losses, item count); default: HF's token cross-entropy
        self.loss_fn = loss_fn or token_loss_sum
        self.dims = dims
        self.comm = communicator
        self.eps = zo_params.eps
        self.trainable_names = trainable
        self.trainable_rows = rows or {}
        self.units: list[Unit] = cut_into_units(self.module, trainable, self.trainable_rows)
        self.param_keys = {id(p): param_key(n) for n, p in self.module.named_parameters() if n in trainable}
        self.perturbations = PerturbationGenerator(zo_config.distribution, sampler=zo_config.z_sampler)
        self.perturbations.fused_passes = zo_config.fused_passes
        layers = [sum(full_numel(r.param) for r in u.params) for u in self.units if u.is_layer]
        self.perturbations.accelerator_span_chunks = accelerator_span_chunks(
            max(layers, default=None), self.perturbations.chunk,
            sum(full_numel(p) for p in self.module.parameters()))
        self.z_stream = agree_on_z_stream(self.comm, z_stream(self.device,
                                                              self.perturbations.counter_based(self.device)))
        if self.perturbations.counter_based(self.device):
            # the fused kernels' self-check (triton_passes) here, once, not inside the first step's streams
            for dtype in {p.dtype for p in self.module.parameters()}:
                self.perturbations.fuses(self.device, dtype)
        # the weights the run started from (weights_fingerprint; ds_zo.initialize fills it in before partitioning)
        self.base_weights: dict = {}
        self.half_dtype: Optional[torch.dtype] = None    # what DeepSpeed cast the parameters to (bf16 / fp16)
        params = dict(self.module.named_parameters())
        self.optimizer.attach(self.perturbations, self.param_keys,
                              {id(params[n]): r.to(self.device) for n, r in self.trainable_rows.items()},
                              {id(p): n for n, p in params.items()})
        if self.trainable_rows and offload.enabled:
            raise ValueError("zero_order.trainable_rows cannot be combined with offload_param yet")
        self.pipeline: Optional[OffloadPipeline] = build_pipeline(
            self.module, self.units, offload, self.zo_config, self.device, self.dims, self.comm,
            self._update_shard) if offload.enabled else None
        # with offload, the resident units' parameters as they must stay (model.half() or .to() under the engine
        # would convert them but not the offloaded layers' store: refused by name at the next use)
        if self.pipeline is not None:
            offloaded = {id(r.param) for u in self.units if id(u) in self.pipeline.index for r in u.params}
            self._resident_specs = [(n, p, p.dtype, p.device) for n, p in self.module.named_parameters()
                                    if id(p) not in offloaded]
        self.copies = PerturbedCopies(self.perturbations, self.param_keys, self.eps, residency=self.pipeline,
                                      before_perturb=self._apply_pending_to_unit)
        # where the ZO forwards' logits exist (a loss of the caller's, or a model that transforms them), the loss reads
        # them at once and they never leave the engine: they may live in a buffer kept from step to step
        # (PerturbedCopies.output)
        self.copies.keep_output = True
        uses = Counter(id(r.param) for u in self.units for r in u.trainable)
        self.copies.shared = {p for p, n in uses.items() if n > 1}
        if self.zo_config.tied_z_cache:
            self.copies.keep_whole = set(self.copies.shared)
        self.copies.row_blocks = self.zo_config.row_blocks
        # With the default loss, a streamed output layer (unless row_blocks is "off") hands its logits to
        # the loss block by block and no slot's logits are ever held (loss.StreamedTokenLoss): the ZO step then needs
        # less memory than a plain inference forward of the batch. Turned off for good if the model transforms the
        # layer's output.
        head = self.module.get_output_embeddings() if hasattr(self.module, "get_output_embeddings") else None
        self._loss_head: Optional[Unit] = next((u for u in self.units if head is not None and u.module is head
                                                and streamed_kind(u, self.zo_config.row_blocks) == "linear"), None)
        self._stream_loss = loss_fn is None and self._loss_head is not None
        self.last_projected_grad: Optional[float | list[float]] = None
        accepted = inspect.signature(self.module.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in accepted
        # an MoE model's router logits (config.output_router_logits) feed HF's load-balancing loss, which a ZO step
        # does not train on (its objective is the token loss; the per-slot router outputs would not line up anyway)
        self._model_flags = {"use_cache": False, **({"output_router_logits": False}
                                                    if "output_router_logits" in accepted else {})}
        self._in_zo_forward = False
        self._consecutive_skips = 0
        self._warned_batch_rows = False
        self._warned_grad_offload = False
        self._data_iterator: Optional[Iterator] = None
        self._streaming: Optional[contextlib.ExitStack] = None
        # Make a pending update visible to anyone who runs or reads the model directly, and stream offloaded units
        # through such forwards (hooks on this model instance only).
        # The same hooks on the decoder body (HF's base_model, e.g. model.model), which helpers call directly
        # (data.tasks.model_candidate_scores); a nested call finds the pass already begun by the outer one.
        body = getattr(self.module, "base_model", None)
        hooked = [self.module] + ([body] if isinstance(body, torch.nn.Module) and body is not self.module else [])
        self._streaming_owner: Optional[int] = None     # id() of it (a module attribute would register it)
        # (ModelHooks, DeepSpeed's wrapped the same way: ds_zo.initialize finds a model's live engine through them,
        # and a copy of the model gets inert ones; see model_hooks)
        for name in self._DEEPSPEED_HOOKS:
            wrap_hook(self, getattr(self, name, None))
        self._hooks = []
        for m in hooked:
            self._hooks += [
                m.register_forward_pre_hook(ModelHook(self, self._before_direct_forward)),
                m.register_forward_hook(ModelHook(self, self._after_direct_forward), always_call=True),
                m.register_state_dict_pre_hook(ModelHook(self, lambda m, *_: self.flush_for_reader())),
                m.register_load_state_dict_pre_hook(ModelHook(self, self._before_load)),
            ]
        # A unit called on its own between steps (model.get_input_embeddings()(ids), a layer, the head) must see every
        # completed step too; inside a ZO forward or a whole-model forward the check returns at once
        self._hooks += [u.module.register_forward_pre_hook(UnitHook(self, self._before_unit_call))
                        for u in self.units if all(u.module is not m for m in hooked)]
        # ZeRO-3: the model's own state_dict() would hold DeepSpeed's empty placeholders (model_hooks)
        self._placeholder_guards = [placeholder_guard(m) for m in hooked] \
            if self.resliced else []
        self._destroyed = False
        self.optimizer.flush_through(self.flush)

    # the handles of DeepSpeed's hooks on the model
    _DEEPSPEED_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")
    _hooks: tuple = ()       # this engine's (a list once _init_zo has made them)
    _placeholder_guards: tuple = ()
    _resident_specs: tuple = ()

    def _remove_hooks(self) -> None:
        for handle in [*self._hooks, *(getattr(self, n, None) for n in self._DEEPSPEED_HOOKS)]:
            if handle is not None:
                handle.remove()

    def __del__(self):
        # Garbage collection (or interpreter exit) runs only DeepSpeed's clean-up: the model's hooks hold this engine,
        # so it is collected only with its model, and applying a pending update while torch tears tensors down aborts
        # the process (THPVariable_clear). Copies still in flight on the pipeline's side streams (a failed forward's
        # prefetched uploads) must land before its device buffers go back to the caching allocator.
        self.__dict__["_destroyed"] = True
        pipeline = self.__dict__.get("pipeline")
        if pipeline is not None:
            try:
                pipeline.synchronize()
            except Exception:       # (interpreter teardown: the CUDA context may be gone already)
                pass
        super().__del__()

    def destroy(self) -> None:
        """Detach this engine from its model: its pending update is applied (`flush`) and its hooks and DeepSpeed's
        forward hooks are removed, so the model can be used alone or by a new engine; then DeepSpeed's clean-up."""
        if not getattr(self, "_destroyed", True):      # (DeepSpeed calls destroy() from __del__, also after a
            self.flush()                                   # failed __init__)
            self._remove_hooks()
            self._restore_compute_dtype()                  # the model is used alone now: one dtype, as loaded
            self.optimizer.flush_through(None)
            self._destroyed = True
        super().destroy()

    # DeepSpeed would wrap the optimizer for bf16/fp16/ZeRO: those wrappers exist to manage gradients, which ZO has none
    # of, so the ZO optimizer is used as is.
    def _broadcast_model(self):
        """Nothing to do: ds_zo.initialize already made every rank's parameters rank 0's (through the communicator,
        which also handles CPU-resident offloaded parameters; DeepSpeed's broadcast would hand those to NCCL, which
        has no CPU backend)."""
        return None

    def _configure_optimizer(self, client_optimizer, model_parameters):
        if not isinstance(client_optimizer, ZOSGD):
            raise TypeError(f"ZOEngine needs a ZOSGD optimizer, got {type(client_optimizer).__name__}")
        self.basic_optimizer = self.optimizer = client_optimizer

    def use_sampler(self, sampler: str) -> None:
        """Draw z with `sampler` ("chunked" or "philox") from now on, where it can draw on this device (a resumed run
        takes the one it drew with; the default "auto" would pick the device's). Every rank calls this together and
        agrees on the result (ranks where it could not be used keep theirs, and the agreement then fails by name)."""
        gen, before = self.perturbations, self.perturbations.sampler
        gen.set_sampler(sampler)
        try:
            counter = gen.counter_based(self.device)
        except ValueError:               # philox cannot run here: keep the sampler the run has
            gen.set_sampler(before)
            counter = gen.counter_based(self.device)
        self.z_stream = agree_on_z_stream(self.comm, z_stream(self.device, counter))

    # -- offload ----------------------------------------------------------------------------------------------------
    def _update_shard(self, su: ShardedUnit, shard: torch.Tensor) -> bool:
        """The fused update on this rank's device shard of a resliced unit (z drawn for the shard's slice only)."""
        opt = self.optimizer
        owed = [(p, shard[su.shard_offsets[i]:su.shard_offsets[i] + su.valid(i)], su.rank * su.shard_numels[i],
                 su.full_numels[i]) for i, p in enumerate(su.params) if opt.owes(p)]
        opt.apply_pending_to_slices(owed)          # all at once: one fused launch per dtype on a GPU
        return bool(owed)

    def comm_stats(self) -> dict:
        """Cumulative bytes moved by this rank: host→device and device→host parameter traffic, bytes received by
        the shard all-gathers, and bytes of the per-step scalar all-reduce."""
        stats = {"h2d_bytes": 0, "d2h_bytes": 0}
        if self.pipeline is not None:
            stats.update({k: self.pipeline.stats[k] for k in ("h2d_bytes", "d2h_bytes")})
        stats["allgather_bytes"] = self.comm.stats["allgather_bytes"]
        stats["allreduce_bytes"] = self.comm.stats["allreduce_bytes"]
        return stats

    @property
    def dp_rank(self) -> int:
        """Which shard of the global batch this rank feeds to train_batch (perturbation-parallel peers share one)."""
        return self.dims.dp_rank

    # -- the pending update -----------------------------------------------------------------------------------------
    def _apply_pending_to_unit(self, unit: Unit) -> bool:
        changed = self.optimizer.apply_pending(r.param for r in unit.trainable)
        if changed and self.pipeline is not None:
            self.pipeline.round_to_storage(unit)
        return changed

    def _apply_remaining_pending(self) -> None:
        """Apply the pending update wherever it is still owed, without a host sync. Offloaded units are streamed
        through the pipeline, so z is drawn on the same device as it was for the perturbation."""
        if self.optimizer.pending is None:
            return
        if self.pipeline is not None:
            owing = [s.unit for s in self.pipeline.order if any(self.optimizer.owes(r.param) for r in s.unit.trainable)]
            if owing:
                self.pipeline.begin(owing, compute=False)
                for unit in owing:
                    self.pipeline.enter(unit)
                    changed = self._apply_pending_to_unit(unit)
                    self.pipeline.exit(unit, changed)
        self.optimizer.flush_resident()

    @property
    def resliced(self) -> bool:
        """Offloaded units are ZeRO-3 shards, resliced through an all-gather in each pass (DistZO2)."""
        return isinstance(self.pipeline, ShardedOffloadPipeline)

    def _refuse_if_destroyed(self, what: str) -> None:
        # the model is used alone or by another engine now: this one's pipeline and store would stream stale
        # values into it, or read them (resliced units)
        if self._destroyed:
            raise RuntimeError(f"{what}: this engine was destroyed (detached from its model); build a new one")

    def units_stored_in_other_dtype(self) -> list:
        """The offload store's units (StoredUnit / ShardedUnit) kept in another dtype than they compute in
        (zero_order.offload_dtype)."""
        if self.pipeline is None:
            return []
        return [s for s in self.pipeline.store.units.values() if s.flat.dtype != s.compute_dtype]

    def _restore_compute_dtype(self) -> None:
        """Store-held tensors in another dtype than they compute in back in that dtype: the parameters (views of the
        store) or, for resliced units, DeepSpeed's shards (`ds_tensor`), which a new engine on this model would
        otherwise take for its compute dtype."""
        resliced = self.resliced
        for s in self.units_stored_in_other_dtype():
            for p in s.params:
                held = p.ds_tensor if resliced else p
                held.data = held.data.to(s.compute_dtype)

    def stored_in_other_dtype(self) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
        """(parameter, the dtype it computes in) for the parameters that are views of an offload store in another
        dtype (not resliced units, whose parameters are DeepSpeed's placeholders)."""
        if self.resliced:
            return []
        return [(p, s.compute_dtype) for s in self.units_stored_in_other_dtype() for p in s.params]

    def flush_for_reader(self) -> None:
        """The model is being read (state_dict) or copied (deepcopy, pickle): make every completed step visible,
        except inside a ZO step (its own forwards read the model) or a direct forward (which flushed as it began)."""
        if not self._destroyed and not self._in_zo_forward and self._streaming_owner is None:
            self.flush()

    def _before_load(self, module, state_dict, prefix, local_metadata, *_) -> None:
        """model.load_state_dict(...) on the live model (restoring the best weights, say): the load must land after
        the pending update, not under it, and, offloaded, after the last pass's write-backs to the store. Refused
        where it cannot be what was meant: parameters replaced (assign=True) would no longer be the ones this engine
        trains, and a ZeRO-3 model's offloaded layers are placeholders (the load would stop half-way)."""
        if self._destroyed:
            return
        if local_metadata.get("assign_to_params_buffers"):
            raise RuntimeError("ds_zo: load_state_dict(..., assign=True) on a model a live engine trains would "
                               "replace its parameters, and the engine would go on training the old ones: load with "
                               "assign=False (the default), which copies the values in")
        if self.resliced:
            raise RuntimeError("ds_zo: this model is ZeRO-3 partitioned: its offloaded layers' parameters are "
                               "DeepSpeed's empty placeholders (the values are shards across the ranks), so "
                               "load_state_dict would stop half-way. Resume with engine.load_checkpoint(folder), or "
                               "load the weights into the model before ds_zo.initialize")
        self.flush_for_reader()

    def flush(self) -> None:
        """Make every completed step visible in the stored parameters (host-side readers may read them after)."""
        if self.pipeline is not None:
            self.pipeline.retire_leftovers()   # a failed forward's prefetched units (resliced: their updated shards)
        self._apply_remaining_pending()
        if self.pipeline is not None:
            self.pipeline.synchronize()
        torch.clear_autocast_cache()    # (casts a caller's autocast region made of the weights before the update)

    # -- direct use of engine.module (inference, generate) ------------------------------------------------------------
    def _before_direct_forward(self, module, args):
        # (a shallow copy of the model, copy.copy, shares these hooks and the parameters: it is the model)
        if self._in_zo_forward or self._streaming_owner is not None:
            return
        self._refuse_converted_model()
        self._streaming_owner = id(module)      # the outermost hooked forward: its end ends the pass
        self.flush()
        self.copies.buffers.drop(OUTPUT_ROLE)   # the ZO forwards' kept logits: not held beside a direct forward's own
        if self.pipeline is not None and self._streaming is None:
            plain = PerturbedCopies(self.perturbations, self.param_keys, self.eps, residency=self.pipeline)
            stack = contextlib.ExitStack()
            if torch.is_grad_enabled():
                # the offloaded layers pass through device buffers that later layers reuse: autograd would take
                # gradients from overwritten weights (it cannot see .data pointing), so no graph is built
                stack.enter_context(torch.no_grad())
                if not self._warned_grad_offload:
                    self._warned_grad_offload = True
                    logger.warning("ds_zo: with parameter offload a direct forward streams the offloaded layers "
                                   "through reused device buffers, so it runs without autograd (as under "
                                   "torch.no_grad()); to backpropagate through the model, engine.destroy() first")
            stack.enter_context(dual_forward(self.units, 1, 0, plain))
            try:
                self.pipeline.begin()
            except BaseException:
                stack.close()       # (a refused pass: the units' wrappers must not outlive it)
                self._streaming_owner = None
                raise
            self._streaming = stack

    def _after_direct_forward(self, module, args, output):
        if id(module) == self._streaming_owner:
            self._end_direct_pass()

    def _end_direct_pass(self) -> None:
        """End the direct forward's pass: also one that a KeyboardInterrupt (or SystemExit) left open, which torch's
        always_call hooks do not see; its units' one-slot wrappers would otherwise stay on through every later ZO
        step, which then perturbed nothing (train_batch and eval_batch call this first)."""
        self._streaming_owner = None
        if self._streaming is not None:
            self._streaming.close()
            self._streaming = None

    def _before_unit_call(self, module, args):
        if self._in_zo_forward or self._streaming_owner is not None or self.optimizer.pending is None:
            return
        self.flush()

    def _refuse_converted_model(self) -> None:
        for name, p, dtype, device in self._resident_specs:
            if p.dtype != dtype or p.device != device:
                raise RuntimeError(f"{name} is {p.dtype} on {p.device}, but was {dtype} on {device} when the engine "
                                   "was built: the model was converted under a live engine with parameter offload "
                                   "(model.half(), .to(...)), which converts the resident units but not the offloaded "
                                   "layers' store. Convert it before ds_zo.initialize, or engine.destroy() first")

    # -- batches ----------------------------------------------------------------------------------------------------
    def _to_device(self, batch) -> dict:
        # any mapping: HF's tokenizers and collators return a BatchEncoding (a UserDict)
        if not isinstance(batch, collections.abc.Mapping) or "input_ids" not in batch:
            raise TypeError(f"a batch must be a mapping with at least 'input_ids' (and optionally attention_mask, "
                            f"labels); got {type(batch).__name__}"
                            + (f" with keys {list(batch)}" if isinstance(batch, collections.abc.Mapping) else ""))
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _micro_batches(self, batch, data_iter) -> list[dict]:
        """The micro-batches of this rank's share of one global batch. A given batch is split into micro-batches of
        train_micro_batch_size_per_gpu rows (memory only: the loss is the exact token mean over all rows); otherwise
        gradient_accumulation_steps micro-batches are drawn from data_iter or the engine's dataloader."""
        if batch is not None:
            batch = self._to_device(batch)
            rows = batch["input_ids"].shape[0]
            share = self.train_micro_batch_size_per_gpu() * self.gradient_accumulation_steps()
            if rows != share and not self._warned_batch_rows:
                # DeepSpeed code that hands train_batch one micro-batch per call would take gas steps, not one
                self._warned_batch_rows = True
                logger.warning(f"ds_zo: train_batch(batch) got {rows} rows, while this rank's share of a global batch "
                               f"is train_micro_batch_size_per_gpu x gradient_accumulation_steps = {share}: each call "
                               "is one ZO step over the rows it is given (split into micro-batches for memory only), "
                               "and global_samples counts them")
            mb = self.train_micro_batch_size_per_gpu() or rows
            return [{k: (v[i:i + mb] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
                     for k, v in batch.items()} for i in range(0, rows, mb)]
        if data_iter is None:
            if self.training_dataloader is None:
                raise ValueError("train_batch needs a batch, a data_iter, or training_data given to ds_zo.initialize")
            if self._data_iterator is None:
                done = self.global_steps * self.gradient_accumulation_steps()     # after a resume: skipped
                self._data_iterator = self._endless_micro_batches(done)
            data_iter = self._data_iterator
        try:
            return [self._to_device(next(data_iter)) for _ in range(self.gradient_accumulation_steps())]
        except StopIteration:
            raise ValueError(f"train_batch: data_iter ran out at step {self.global_steps} (it must yield "
                             f"gradient_accumulation_steps = {self.gradient_accumulation_steps()} micro-batches a "
                             "step)") from None

    def _endless_micro_batches(self, skip: int) -> Iterator:
        """The engine's dataloader epoch after epoch (each epoch's shuffle from its sampler's set_epoch), from the
        `skip`-th micro-batch on: a resumed run (load_checkpoint) goes on with the micro-batches it would have had."""
        loader = self.training_dataloader
        if len(loader) == 0:
            raise ValueError("train_batch: the training_data given to ds_zo.initialize gives no micro-batch")
        epoch, skip = divmod(skip, len(loader))
        while True:
            sampler = getattr(loader, "data_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            # next() only: DeepSpeed's loader is its own iterator, and iter() on it (a for loop, yield from) restarts it
            batches = iter(loader)
            for _ in range(skip):
                next(batches)
            skip = 0
            while (micro := next(batches, None)) is not None:
                yield micro
            epoch += 1

    @staticmethod
    def _model_inputs(batch: dict, slots: int) -> dict:
        """The batch's model inputs, replicated once per slot (per-row tensors only)."""
        rows = batch["input_ids"].shape[0]
        out = {}
        for k in MODEL_INPUT_KEYS:
            v = batch.get(k)
            if v is not None:
                out[k] = torch.cat([v] * slots) if slots > 1 and v.shape[0] == rows else v
        return out

    # -- forwards ---------------------------------------------------------------------------------------------------
    def _slot_losses(self, batch: dict, copies: PerturbedCopies, keep: Optional[int] = -1) -> list[tuple[float, int]]:
        """One model forward over the batch replicated once per slot; per slot, (token loss sum, token count)."""
        rows = batch["input_ids"].shape[0]
        slots = len(copies.slots)
        labels = default_labels(batch)
        extra, labels = self.scored_positions(labels, keep)
        sink = None
        if self._stream_loss and copies.perturbs():     # the output layer streams only in perturbed forwards
            sink = StreamedTokenLoss(labels, slots, self._loss_head.module.out_features, self.device)
            copies.token_loss = (self._loss_head.name, sink)
        self._in_zo_forward = True
        try:
            with eval_mode(self.module), torch.no_grad(), forward_autocast(self), \
                    dual_forward(self.units, slots, rows, copies):
                if self.pipeline is not None:
                    self.pipeline.begin()
                logits = self.module(**self._model_inputs(batch, slots), **self._model_flags, **extra).logits
        finally:
            self._in_zo_forward = False
            copies.token_loss = None
        if sink is not None and sink.started:
            if logits is sink.placeholder and sink.complete:
                return sink.results()
            # the model changed the output layer's output (scaled, soft-capped, sliced it): the loss needs the real
            # logits. This forward is run again (the same z; pending updates were applied by the first).
            self._stream_loss = False
            logger.warning("ds_zo: %s transforms its output layer's output; the loss now reads whole logits",
                           type(self.module).__name__)
            return self._slot_losses(batch, copies, keep)
        return [self.loss_fn(logits[i * rows:(i + 1) * rows], labels) for i in range(slots)]

    def kept_positions(self, label_sets: list[torch.Tensor]) -> Optional[int]:
        """One choice of `scored_positions` for all the micro-batches of a step: the most positions any of them
        needs, or None (whole sequences) where that many would not be a short tail of every one of them. A choice per
        micro-batch made g depend on how a batch was cut into micro-batches (the output matmul over another number
        of positions rounds differently: 1.4e-5 relative on OPT, found in review)."""
        if not self._accepts_logits_to_keep:
            return None
        keeps = [self._tail(labels) for labels in label_sets]
        if not keeps or any(k is None for k in keeps):
            return None
        keep = max(keeps)
        return keep if all(self._short_tail(keep, labels.shape[1]) for labels in label_sets) else None

    @staticmethod
    def _short_tail(keep: int, length: int) -> bool:
        return keep <= MAX_KEPT_POSITIONS and 4 * keep <= length

    def _tail(self, labels: torch.Tensor) -> Optional[int]:
        length = labels.shape[1]
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(labelled.min()) if labelled.numel() else length - 1
        keep = length - max(first - 1, 0)
        return keep if self._short_tail(keep, length) else None

    def scored_positions(self, labels: torch.Tensor, keep: Optional[int] = -1) -> tuple[dict, torch.Tensor]:
        """Only the positions that predict a labelled token need the output layer: with prompt-classification
        batches (left-padded, label word last) that is one position instead of the whole sequence, which saves the
        largest matmul of a small model and the logits' memory. Returns (forward kwargs, the labels to score).
        Used only for short tails (<= MAX_KEPT_POSITIONS and a quarter of the sequence): an output matmul over
        another number of rows may round differently, so the choice must not flip between layouts that cut the same
        batch differently."""
        if keep == -1:          # decided for this batch alone
            keep = self.kept_positions([labels])
        if keep is None:
            return {}, labels
        return {"logits_to_keep": keep}, labels[:, labels.shape[1] - keep:]

    def train_batch(self, batch: Optional[dict] = None, data_iter: Optional[Iterator] = None) -> float:
        """One ZO step over this rank's share of a global batch (shard `dp_rank` of `dp_world_size`); returns the
        mean over perturbations of (L+ + L−)/2 on the whole global batch."""
        self._refuse_if_destroyed("train_batch")
        self._end_direct_pass()
        self._refuse_converted_model()
        lr = self.optimizer.current_lr()
        wd = self.optimizer.weight_decay()      # (checks groups edited by hand before a micro-batch is drawn)
        micro = self._micro_batches(batch, data_iter)
        step = self.global_steps
        seed = step_seed(self.zo_config.seed, step)
        q = self.zo_config.num_perturbations
        # every perturbation's + and − as slots of one forward (each unit is visited, and moved, once per micro-batch);
        # under perturbation parallelism each rank of a pair runs one sign
        all_slots = [(j, sign) for j in range(q) for sign in (1, -1)]
        mine = [i for i, (_, sign) in enumerate(all_slots) if self.dims.pertp == 1 or (sign == 1) == (self.dims.pert_rank == 0)]
        self.copies.set_slots(seed, [all_slots[i] for i in mine])
        # [sum of token losses per slot..., token count per slot..., rows, data check]: the one collective of the step.
        # The rows of a data-parallel shard are counted by one rank of its perturbation-parallel group; under
        # perturbation parallelism the + rank adds the sum of its token ids and the − rank subtracts its own, so the
        # total is 0 when the two scored the same batch
        totals = torch.zeros(2 * len(all_slots) + 2, dtype=torch.float64)
        if self.dims.pert_rank == 0:
            totals[-2] = sum(mb["input_ids"].shape[0] for mb in micro)
        self._agree_on_forwards(len(micro), "train_batch")
        keep = self.kept_positions([default_labels(mb) for mb in micro])
        if not micro:
            self._apply_remaining_pending()     # an empty shard: the previous step's update still lands
        for mb in micro:
            for i, (loss_sum, count) in zip(mine, self._slot_losses(mb, self.copies, keep)):
                totals[i] += loss_sum
                totals[len(all_slots) + i] += count
            # units that did not run in the forward still owe the previous step's update
            self._apply_remaining_pending()
        if self.dims.pertp > 1:         # (after the forwards: on a GPU reading the sum waits for the device)
            ids = sum(float(mb["input_ids"].sum(dtype=torch.float64)) for mb in micro)
            totals[-1] = ids if self.dims.pert_rank == 0 else -ids
        self.comm.all_reduce_sum(totals)
        counts = [int(totals[len(all_slots) + i].item()) for i in range(len(all_slots))]
        if counts[0::2] != counts[1::2] or totals[-1].item() != 0.0:
            # under perturbation parallelism each sign's rank scores its own copy of the shard: they must be the same
            raise ValueError(f"step {step}: the θ+εz and θ−εz forwards scored different batches ({counts[0::2]} and "
                             f"{counts[1::2]} tokens, token ids differing by {totals[-1].item():g}): the ranks of a "
                             "perturbation-parallel group must pass train_batch the same batch (shard the global "
                             "batch by engine.dp_rank, not by rank)")
        means = [mean_loss([(totals[i].item(), counts[i])]) for i in range(len(all_slots))]
        grads = [(means[2 * j] - means[2 * j + 1]) / (2 * self.eps) for j in range(q)]
        losses = [(means[2 * j] + means[2 * j + 1]) / 2 for j in range(q)]
        loss = sum(losses) / q
        samples = self.global_samples + int(totals[-2].item())     # a given batch may hold any number of rows
        if not all(math.isfinite(x) for x in means):   # identical on every rank: the means were all-reduced
            return self._skip_step(step, means, samples)
        self._consecutive_skips = 0
        self.optimizer.record_step(step, seed, grads, lr, wd)
        if not self.zo_config.fuse_update:
            # eager: the update lands now, and host readers of the parameters may read right after; offloaded
            # units' write-backs to the store are in flight on their stream until synchronised
            self.flush()
        self._take_model_step(None)  # DeepSpeed's bookkeeping: lr scheduler, global_steps (and train_batch_size() rows)
        self.global_samples = samples
        self.last_projected_grad = grads[0] if q == 1 else grads
        self._write_monitor(loss, grads, lr)
        return loss

    def _skip_step(self, step: int, means: list[float], samples: int) -> float:
        """A non-finite L+ or L−: no update, nothing in the step log, the lr schedule does not advance; the step
        number does (so the next step draws a fresh z). Too many in a row abort the run."""
        self._consecutive_skips += 1
        self.skipped_steps += 1
        self._step_applied = False      # (was_step_applied(), as DeepSpeed's overflow step)
        self.global_steps += 1
        self.global_samples = samples
        self.last_projected_grad = float("nan") if self.zo_config.num_perturbations == 1 else \
            [float("nan")] * self.zo_config.num_perturbations
        limit = self.zo_config.max_consecutive_skips
        if self.global_rank == 0:
            print(f"[ds_zo] step {step}: non-finite loss {means}; update skipped "
                  f"({self._consecutive_skips} in a row, {self.skipped_steps} in total)", flush=True)
        if self._consecutive_skips >= limit:
            raise NonFiniteLossError(
                f"{self._consecutive_skips} consecutive ZO steps (up to step {step}) had non-finite losses "
                f"({means}); stopping (zero_order.max_consecutive_skips = {limit}). The parameters hold the updates of "
                "every step before them, the last of which may be what made the losses non-finite, and no checkpoint "
                "was written since: resume from the last checkpoint with a lower lr or eps, or check the data")
        return float("nan")

    def backward(self, loss, *args, **kwargs):
        raise RuntimeError("ds_zo trains without gradients, so engine.backward() has nothing to do: one ZO step "
                           "(both perturbed forwards and the update) is engine.train_batch(batch), which returns the "
                           "loss; engine.eval_batch(batch) gives the loss at the current parameters")

    def step(self, *args, **kwargs):
        raise RuntimeError("ds_zo's engine.step() would apply no update: one ZO step (both perturbed forwards and the "
                           "update) is engine.train_batch(batch), in place of forward + backward + step")

    def eval_batch(self, batch: dict) -> float:
        """The mean token loss at the current parameters (every completed step applied) over the global batch: each
        data-parallel rank passes its shard (a collective: every rank calls it)."""
        self._refuse_if_destroyed("eval_batch")
        # (before no_grad: a pass left open by a KeyboardInterrupt holds autograd off, and no_grad would restore that)
        self._end_direct_pass()
        self._refuse_converted_model()
        with torch.no_grad():
            return self._eval_batch(batch)

    def _eval_batch(self, batch: dict) -> float:
        self.flush()
        batch = self._to_device(batch)
        rows = batch["input_ids"].shape[0]
        self._agree_on_forwards(1 if rows else 0, "eval_batch")
        plain = PerturbedCopies(self.perturbations, self.param_keys, self.eps, residency=self.pipeline)
        (loss_sum, count), = self._slot_losses(batch, plain) if rows else [(0.0, 0)]   # an empty shard: nothing
        totals = self.comm.all_reduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64), group="dp")
        return mean_loss([(totals[0].item(), int(totals[1].item()))])

    def _agree_on_forwards(self, forwards: int, what: str) -> None:
        """Under ZeRO-3 reslicing every forward all-gathers each unit's shards over the partition group, so its ranks
        must run as many forwards (micro-batches) as each other: otherwise one waits in an all-gather while another
        has gone on, until the collective timeout, with an error that blames a dead peer. One small all-reduce,
        only there."""
        if not self.resliced or self.dims.partition == 1:
            return
        counts = torch.zeros(self.dims.partition, dtype=torch.float64)
        counts[self.dims.partition_rank] = forwards
        self.comm.all_reduce_sum(counts, group="partition")
        if len(set(counts.tolist())) > 1:
            raise ValueError(f"{what}: the ranks of a ZeRO-3 partition group would run {[int(c) for c in counts]} "
                             f"forwards (micro-batches of train_micro_batch_size_per_gpu rows, none for an empty "
                             "shard); reslicing gathers every unit in each forward, so they must run as many: give "
                             "each rank of a group a share of the same number of micro-batches")

    def _write_monitor(self, loss: float, grads: list[float], lr: float) -> None:
        if self.monitor.enabled and self.global_rank == 0:
            x = self.global_samples
            events = [("Train/Samples/train_loss", loss, x), ("Train/Samples/lr", lr, x)]
            events += [(f"Train/Samples/projected_grad{'' if len(grads) == 1 else f'_{j}'}", g, x)
                       for j, g in enumerate(grads)]
            self.monitor.write_events(events)

    # -- state ------------------------------------------------------------------------------------------------------
    def module_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        """The full parameters with every completed step applied, on every rank (resliced units are gathered: under
        ZeRO-3 a collective over the partition group, which every rank calls; save from rank 0 only)."""
        self._refuse_if_destroyed("module_state_dict")
        self.flush()
        for guard in self._placeholder_guards:      # its placeholders are replaced below
            guard.reading = True
        try:
            sd = super().module_state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars,
                                           exclude_frozen_parameters=exclude_frozen_parameters)
        finally:
            for guard in self._placeholder_guards:
                guard.reading = False
        if self.resliced:
            full = self._gather_resliced()
            names = {}
            for n, p in self.module.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), []).append(prefix + n)
            for pid, tensor in full.items():
                for n in names.get(pid, []):
                    if n in sd:
                        sd[n] = tensor
        return sd

    def _gather_resliced(self) -> dict[int, torch.Tensor]:
        """id(param) -> full CPU tensor for every resliced parameter (a pass of all-gathers; every rank calls it)."""
        out = {}
        pipe = self.pipeline
        pipe.begin()
        for su in pipe.order:
            pipe.enter(su.unit)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            for p in su.params:
                out[id(p)] = p.data.detach().to("cpu", copy=True)
            pipe.exit(su.unit, False)
        return out

    @property
    def step_log(self):
        return self.optimizer.step_log

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = True) -> bool:
        """Save this run's state in dir/<tag> (default tag global_step<N>) and point dir/latest at it, atomically.
        Every rank calls it. Only trainable parameters are stored (the rest is the base model)."""
        from . import checkpoint
        self._refuse_if_destroyed("save_checkpoint")
        if not save_latest or not exclude_frozen_parameters:
            raise ValueError("ds_zo checkpoints always update 'latest' and store trainable parameters only")
        checkpoint.save(self, save_dir, tag, client_state)
        return True

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """Restore parameters, step log, counters and lr schedule from dir/<tag> (default: dir/latest); returns
        (path, client_state) like DeepSpeed. Training then continues exactly as the saved run would have. As in
        DeepSpeed, a folder with no checkpoint yet (no tag given and no 'latest' file: a first run) loads nothing and
        returns (None, None); a tag given that is not there is an error."""
        from . import checkpoint
        self._refuse_if_destroyed("load_checkpoint")
        given = {"load_module_strict": (load_module_strict, True),
                 "load_optimizer_states": (load_optimizer_states, True),
                 "load_lr_scheduler_states": (load_lr_scheduler_states, True),
                 "load_module_only": (load_module_only, False), "custom_load_fn": (custom_load_fn, None)}
        partial = [f"{k}={v!r}" for k, (v, default) in given.items() if v != default]
        if partial:
            # the parameters are the base weights plus the seed log's updates, and the step count, log and lr
            # schedule are what the next step's z and lr come from: a part of them would not continue the run
            raise ValueError(f"ds_zo.load_checkpoint({', '.join(partial)}): a ZO checkpoint is restored whole "
                             "(parameters, step log, counters, lr schedule); for the fine-tuned weights alone load "
                             "the saved model (save_pretrained) or rebuild them with `python -m ds_zo.replay`")
        folder, client_state = checkpoint.load(self, load_dir, tag)
        if folder is not None:
            self._data_iterator = None      # the engine's dataloader goes on from the checkpoint's step
        return folder, client_state
