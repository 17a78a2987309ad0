"""ds_zo's collectives: the per-step scalar all-reduce (losses and token counts), the coalesced all-gather of a unit's
shards within a partition group, and the one-time model broadcast. Every collective runs on ds_zo's own groups,
created with `zero_order.collective_timeout_s`, and a failure (a dead or hung peer) becomes a CollectiveError that
names the rank, the collective and the timeout instead of a hang. Bytes are counted per rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dims import ParallelDims


class CollectiveError(RuntimeError):
    pass


def collective_error(rank: int, world: int, what: str, group: str, timeout_s: float, err: Exception) -> CollectiveError:
    return CollectiveError(
        f"rank {rank}/{world}: {what} over the {group} group failed (timeout {timeout_s:g} s; "
        f"zero_order.collective_timeout_s): a peer rank probably died or stopped responding, or is at another "
        f"collective (every rank must make the same calls, checkpoint saves and loads included). "
        f"Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def startup_barrier(rank: int, world: int, timeout_s: float) -> None:
    """A barrier over the default group (its timeout set at init_distributed), before ds_zo's groups exist."""
    if world > 1:
        try:
            dist.barrier()
        except Exception as e:
            raise collective_error(rank, world, "start-up barrier", "world", timeout_s, e) from e


def startup_device() -> torch.device:
    """Where host tensors go for a collective: NCCL moves device memory only (this rank's device, which initialize
    has made current), gloo host memory."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def agree_on_settings(rank: int, world: int, timeout_s: float, settings: dict, device: torch.device) -> None:
    """Refuse at once, on every rank, settings that differ from rank 0's (name -> any JSON-able value), over the
    default group, before ds_zo's groups exist: a different perturbation_parallel or partition size hung in
    new_group until the timeout, a different num_perturbations crashed gloo, a different seed or lr trained
    diverging models unsaid. Each setting goes as a 6-byte digest."""
    if world == 1:
        return
    import hashlib
    import json
    digests = [hashlib.blake2b(json.dumps(v, sort_keys=True, default=str).encode(), digest_size=6).digest()
               for v in settings.values()]
    table = torch.zeros(world, len(settings), 6, dtype=torch.float64)
    table[rank] = torch.tensor([list(d) for d in digests], dtype=torch.float64)
    table = table.to(device)
    try:
        dist.all_reduce(table)
    except Exception as e:
        raise collective_error(rank, world, "start-up settings check", "world", timeout_s, e) from e
    table = table.cpu()
    differ = (table != table[0]).any(dim=2)                  # [rank, setting]: differs from rank 0's
    if differ.any():
        from ..config import ConfigError
        names = [name for i, name in enumerate(settings) if differ[:, i].any()]
        ranks = [r for r in range(world) if differ[r].any()]
        raise ConfigError(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                          f"{'were' if len(ranks) > 1 else 'was'} started with other {', '.join(names)} than rank 0: "
                          "every rank of a ds_zo job must run the same ds_config, model and trainable set (the "
                          "ranks would hang in their first collectives or train different models)")


# every forward through a ZeRO-3 model gathers its units: the ranks of a partition group must make the same ones,
# direct forwards and generate too (a rank generating longer, or alone, waits in this all-gather)
STEP_GATHER = ("shard all-gather (under ZeRO-3 every forward through the model, direct ones and generate included, "
               "and engine.module_state_dict() gather each offloaded unit over the partition group: its ranks must "
               "make the same calls, and generate needs synced_gpus=True)")


class Communicator:
    def __init__(self, dims: ParallelDims, timeout_s: float, staging_device: torch.device | None = None):
        self.dims = dims
        self.timeout_s = timeout_s
        self.stats = {"allreduce_bytes": 0, "allgather_bytes": 0, "allreduce_calls": 0, "allgather_calls": 0}
        # NCCL moves device memory only: host tensors (the float64 loss totals, CPU-resident offloaded parameters at
        # the start-up broadcast) then travel through this device
        if staging_device is None and dims.world > 1:
            device = startup_device()
            staging_device = device if device.type == "cuda" else None
        self.staging_device = staging_device

    def _run_on_device(self, t: torch.Tensor, collective) -> None:
        """Run `collective(tensor)` on t, through the staging device when t is a host tensor the backend cannot take
        (copied there and back: a host synchronisation, once per step for the loss totals)."""
        if self.staging_device is None or t.device.type != "cpu":
            collective(t)
            return
        staged = t.to(self.staging_device)
        collective(staged)
        t.copy_(staged.cpu())

    def _fail(self, what: str, group: str, err: Exception) -> CollectiveError:
        return collective_error(self.dims.rank, self.dims.world, what, group, self.timeout_s, err)

    def all_reduce_sum(self, values: torch.Tensor, group: str = "world") -> torch.Tensor:
        """Sum a small float64 vector over every rank of a group (over the world: the only per-step collective of ZO
        data/perturbation parallelism). In place; returns it."""
        if self.dims.world == 1:
            return values
        self._sum(values, group, "scalar all-reduce")
        self.stats["allreduce_bytes"] += values.numel() * values.element_size()
        self.stats["allreduce_calls"] += 1
        return values

    def _sum(self, values: torch.Tensor, group: str, what: str) -> None:
        try:
            self._run_on_device(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM,
                                                                  group=self.dims.groups[group]))
        except Exception as e:  # gloo raises RuntimeError, NCCL DistBackendError; both mean the same here
            raise self._fail(what, group, e) from e

    def all_gather_shards(self, out: torch.Tensor, shard: torch.Tensor, what: str = STEP_GATHER) -> None:
        """One coalesced all-gather of a unit's flat shard within this rank's partition group: out = (k * S,)."""
        try:
            dist.all_gather_into_tensor(out, shard, group=self.dims.groups["partition"])
        except Exception as e:
            raise self._fail(what, "partition", e) from e
        self.stats["allgather_bytes"] += (self.dims.partition - 1) * shard.numel() * shard.element_size()
        self.stats["allgather_calls"] += 1

    def broadcast_from_rank0(self, tensors) -> None:
        """Make every rank's replica identical to rank 0's (once, at start-up)."""
        if self.dims.world == 1:
            return
        try:
            for t in tensors:
                self._run_on_device(t, lambda x: dist.broadcast(x, src=0, group=self.dims.groups["world"]))
        except Exception as e:
            raise self._fail("model broadcast", "world", e) from e

    def gather_strings(self, value: str, width: int = 64, what: str = "start-up agreement check") -> list[str]:
        """Every rank's `value` (ASCII, at most `width` bytes), in rank order: for agreement checks (not counted in
        the per-step traffic `stats`). `what` names it in a failure (every rank must be at the same call)."""
        data = value.encode("ascii")
        if len(data) > width:
            raise ValueError(f"gather_strings: {value!r} is longer than {width} bytes")
        if self.dims.world == 1:
            return [value]
        table = torch.zeros(self.dims.world, width, dtype=torch.float64)
        table[self.dims.rank, :len(data)] = torch.tensor(list(data), dtype=torch.float64)
        self._sum(table, "world", what)
        return [bytes(int(x) for x in row if x).decode("ascii") for row in table.tolist()]

    def barrier(self) -> None:
        if self.dims.world > 1:
            try:
                dist.barrier(group=self.dims.groups["world"])
            except Exception as e:
                raise self._fail("barrier", "world", e) from e
