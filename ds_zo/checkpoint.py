"""ZO checkpoints: engine.save_checkpoint(dir, tag) / engine.load_checkpoint(dir[, tag]), laid out as DeepSpeed lays
them out (a folder per tag, per-rank files, a `latest` file), but written safely and atomically:

    dir/latest                          the newest complete tag (written last, by rename)
    dir/<tag>/zo_state.json             counters, lr scheduler, layout, trainable set, file checksums (rank 0)
    dir/<tag>/steps.jsonl               the step log (step, seed, g, lr, wd): replays the whole fine-tune
    dir/<tag>/zo_rank_00000.safetensors trainable parameters this rank is the master of: all of them on rank 0 for
                                        replicated models; under ZeRO-3 reslicing each rank's own shards

Tensors are safetensors and metadata is JSON: nothing read back is unpickled or executed. Every rank writes into
`<tag>.partial/`; after a barrier rank 0 renames it to `<tag>` and then rewrites `latest` through a temporary file,
each step fsynced, so a process killed at any point leaves the previous checkpoint and `latest` intact. Loading
verifies the checksums, the model's parameter names/shapes/dtypes, its frozen parameters' weights against those the
run started from (weights_fingerprint) and the parallel layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

import torch

from .optimizer import StepRecord
from .perturb import parse_z_stream
from .weights_fingerprint import describe, differing

logger = logging.getLogger(__name__)

FORMAT = "ds_zo-checkpoint-1"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def together(comm, what: str, fn):
    """fn() on this rank, then whether it succeeded on every rank (a collective: every rank calls it). A rank whose
    fn raised raises that; the others raise an error naming it, at once: without this they went on to the next
    collective and waited there until the collective timeout blamed a dead peer (a checkpoint file only one rank
    cannot read, a save folder one node does not share)."""
    try:
        result, failure = fn(), None
    except Exception as e:              # noqa: BLE001 (re-raised below, on this rank, after the others are told)
        result, failure = None, e
    outcomes = comm.gather_strings("ok" if failure is None else "failed",
                                   what=f"agreement after {what} (every rank must take part)")
    if failure is not None:
        raise failure
    failed = [r for r, o in enumerate(outcomes) if o != "ok"]
    if failed:
        raise CheckpointError(f"{what} failed on rank{'s' if len(failed) > 1 else ''} "
                              f"{', '.join(map(str, failed))} (the error there says why); every rank stops here")
    return result


def check_shared_folder(comm, rank: int, folder: str, what: str) -> None:
    """Every rank sees the file rank 0 writes in `folder` (a collective): checkpoints need a folder every rank
    shares, and a multi-node job whose folder is not shared would fail only at its first save (by default the last,
    after every step). `what` names the folder in the message (the option that set it)."""
    import secrets
    token = comm.gather_strings(secrets.token_hex(8) if rank == 0 else "", what=f"checking {what}")[0]
    probe = os.path.join(os.path.abspath(folder), f".ds_zo-shared-{token}")

    def write():
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "w"):
                pass

    def see():
        if not os.path.isfile(probe):
            raise CheckpointError(f"{what} {os.path.abspath(folder)!r}: rank {rank} does not see the file rank 0 "
                                  "wrote there; it must be a folder on a file system every rank shares (each rank "
                                  "writes its part of every checkpoint there)")
    try:
        together(comm, f"writing a file in {what} {os.path.abspath(folder)!r}", write)
        together(comm, f"checking that every rank sees {what} {os.path.abspath(folder)!r}", see)
    finally:
        if rank == 0 and os.path.exists(probe):
            os.remove(probe)


def _safe_tag(tag: str) -> str:
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or tag.endswith(".partial"):
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain folder name")
    return tag


def _brief(rows: dict) -> str:
    return "{" + ", ".join(f"{n}: {len(r)} rows" for n, r in rows.items()) + "}" if rows else "none"


def model_fingerprint(engine) -> list:
    return [[n, list(getattr(p, "ds_shape", p.shape)), str(p.dtype)] for n, p in engine.module.named_parameters()]


def _model_differences(saved: list, current: list) -> str:
    """What differs between two model fingerprints, briefly (the first few of each kind)."""
    was = {n: (shape, dtype) for n, shape, dtype in saved}
    now = {n: (shape, dtype) for n, shape, dtype in current}
    parts = []
    for what, names in (("only in the checkpoint", [n for n in was if n not in now]),
                        ("only in this model", [n for n in now if n not in was])):
        if names:
            parts.append(f"parameters {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    for i, what in ((0, "shape"), (1, "dtype")):
        changed = [f"{n} {was[n][i]} -> {now[n][i]}" for n in was if n in now and was[n][i] != now[n][i]]
        if changed:
            parts.append(f"{what} saved -> now: {'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}")
    if was.keys() == now.keys() and not parts:
        parts.append("the parameters come in another order")
    hint = ("; a dtype differs: the checkpoint's run had another bf16/fp16 setting, and resuming needs the same"
            if any(was[n][1] != now[n][1] for n in was if n in now) else "")
    return "; ".join(parts) + hint


def stored_dtypes(engine) -> dict[str, str]:
    """Parameters the run keeps in an offload store of a dtype other than the one they compute in
    (zero_order.offload_dtype): name -> that dtype. Every update to them was rounded to it."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {names[id(p)]: str(s.flat.dtype) for s in engine.units_stored_in_other_dtype() for p in s.params
            if id(p) in names}


def _rank_tensors(engine) -> dict[str, torch.Tensor]:
    """What this rank is the master of, as CPU tensors keyed by name."""
    out = {}
    sharded = {}
    if engine.resliced:
        for su in engine.pipeline.order:
            if any(r.trainable for r in su.unit.params):
                sharded.update({id(p): (su, i) for i, p in enumerate(su.params)})
    for n, p in engine.module.named_parameters():
        if n not in engine.trainable_names:
            continue
        if id(p) in sharded:
            su, i = sharded[id(p)]
            o = su.shard_offsets[i]
            out[f"{n}@shard"] = su.flat[o:o + su.shard_numels[i]].detach().cpu().clone()
        elif engine.global_rank == 0:
            out[n] = p.detach().cpu().clone().contiguous()
    return out


def _remove_leftovers(save_dir: str) -> None:
    """What interrupted saves of any tag left behind and nothing reads: `<tag>.partial` folders (never complete),
    and `<tag>.old` folders whose `<tag>` is complete again (`read_state` reads `<tag>.old` only while `<tag>` is
    missing). One job saves into a folder at a time, so no other save is using them."""
    for entry in os.listdir(save_dir):
        path = os.path.join(save_dir, entry)
        if not os.path.isdir(path):
            continue
        if entry.endswith(".partial") or (entry.endswith(".old") and
                                          os.path.isfile(os.path.join(save_dir, entry[:-4], "zo_state.json"))):
            shutil.rmtree(path, ignore_errors=True)


def check_client_state(value, path: str = "client_state") -> None:
    """client_state is kept in zo_state.json, since loading a ds_zo checkpoint never unpickles: it must be JSON
    that comes back as it was given (DeepSpeed pickles it). A tuple would come back a list and a non-string key a
    string, silently; a tensor or a NumPy integer would not be written. Rank 0's is saved, as DeepSpeed saves it."""
    if value is None or isinstance(value, (str, int, float)):          # (bool is an int)
        return
    if type(value) is list:
        for i, v in enumerate(value):
            check_client_state(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise CheckpointError(f"{path}: key {k!r} is a {type(k).__name__}, which JSON would turn into the "
                                      f"string {json.dumps(str(k))}; ds_zo keeps client_state as JSON (loading a "
                                      "checkpoint never unpickles): use string keys")
            check_client_state(v, f"{path}[{k!r}]")
        return
    raise CheckpointError(f"{path}: a {type(value).__name__} ({str(value)[:60]!r}); ds_zo keeps client_state as JSON "
                          "(loading a checkpoint never unpickles): use dicts with string keys, lists, strings, "
                          "numbers, booleans and None (e.g. tensor.tolist(), int(x), list(a_tuple))")


def save(engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None) -> str:
    from safetensors.torch import save_file

    engine.flush()
    tag = _safe_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    if tag.endswith(".old"):
        raise CheckpointError(f"checkpoint tag {tag!r}: a name ending in '.old' is where a replaced tag waits")
    rank, comm = engine.global_rank, engine.comm
    save_dir = os.path.abspath(save_dir)
    partial = os.path.join(save_dir, tag + ".partial")

    def make_partial():
        if rank == 0:
            check_client_state(client_state)      # (before anything is written)
            os.makedirs(save_dir, exist_ok=True)
            _remove_leftovers(save_dir)
            shutil.rmtree(partial, ignore_errors=True)   # leftovers of an interrupted save
            os.makedirs(partial)

    def write_rank_file():
        if not os.path.isdir(partial):
            raise CheckpointError(f"saving checkpoint {tag!r}: rank {rank} does not see {partial!r}, which rank 0 "
                                  "made: the save folder must be on a file system every rank shares")
        path = os.path.join(partial, f"zo_rank_{rank:05d}.safetensors")
        save_file(_rank_tensors(engine), path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return _sha256(path)

    together(comm, f"making checkpoint folder {partial!r}", make_partial)
    sha = together(comm, f"writing the rank files of checkpoint {tag!r}", write_rank_file)
    shas = comm.gather_strings(sha, what=f"checksums of checkpoint {tag!r} (every rank must take part)")
    files = {f"zo_rank_{r:05d}.safetensors": h for r, h in enumerate(shas)}   # rank 0 lists them
    together(comm, f"completing checkpoint {tag!r}",
              lambda: _complete(engine, save_dir, partial, tag, files, client_state) if rank == 0 else None)
    return os.path.join(save_dir, tag)


def _complete(engine, save_dir: str, partial: str, tag: str, files: dict, client_state) -> None:
    """Rank 0, once every rank's file is written: the step log and zo_state.json, then the renames that make the
    tag complete and `latest` point at it."""
    with open(os.path.join(partial, "steps.jsonl"), "w") as f:
        for r in engine.step_log:
            f.write(json.dumps(r.to_json()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    state = {
        "format": FORMAT, "tag": tag,
        "global_steps": engine.global_steps, "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "consecutive_skips": engine._consecutive_skips,     # (a resumed run stops where the whole run would)
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
        "layout": {"world": engine.dims.world, "pertp": engine.dims.pertp, "partition": engine.dims.partition,
                   "resliced": engine.resliced},
        "trainable": sorted(engine.trainable_names),
        "trainable_rows": {n: r.tolist() for n, r in engine.trainable_rows.items()},
        "distribution": engine.zo_config.distribution,
        "eps": engine.eps, "num_perturbations": engine.zo_config.num_perturbations,   # resume says a change
        "z_stream": engine.z_stream,          # the sampler z came from: a replay must use the same one
        "model": model_fingerprint(engine),
        "base_weights": engine.base_weights,   # what the run started from: resume and replay compare
        "half_dtype": str(engine.half_dtype) if engine.half_dtype is not None else None,   # replay casts to it
        "stored_dtypes": stored_dtypes(engine),     # replay rounds each update to them, as the run did
        "files": files,
        "steps_sha256": _sha256(os.path.join(partial, "steps.jsonl")),
        "client_state": client_state or {},
    }
    _write_atomic(os.path.join(partial, "zo_state.json"), json.dumps(state, indent=1).encode())
    _fsync_dir(partial)
    final = os.path.join(save_dir, tag)
    old = final + ".old"
    if os.path.exists(final):
        # replacing a tag: the old one is moved aside first; until the new one is in place, `read_state` reads
        # the tag from `<tag>.old` (a save killed between the two renames leaves only that)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_dir(save_dir)
    _write_atomic(os.path.join(save_dir, "latest"), tag.encode())
    shutil.rmtree(old, ignore_errors=True)


def read_state(load_dir: str, tag: Optional[str] = None) -> tuple[str, dict]:
    """(checkpoint folder, its verified zo_state.json)."""
    load_dir = os.path.abspath(load_dir)
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"no checkpoint in {load_dir!r}: the file 'latest' is missing")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, _safe_tag(tag))
    if not os.path.isdir(folder) and os.path.isdir(folder + ".old"):
        folder += ".old"            # a save replacing this tag was killed between its two renames: the tag as it was
    state_path = os.path.join(folder, "zo_state.json")
    if not os.path.isfile(state_path):
        theirs = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                        if f.endswith(("_model_states.pt", "_optim_states.pt")))
        if theirs:
            raise CheckpointError(f"checkpoint {folder!r} was written by DeepSpeed's own engine ({theirs[0]}), not by "
                                  "ds_zo (zo_state.json): load its weights into the model before ds_zo.initialize "
                                  "(the 'module' entry of mp_rank_00_model_states.pt, or DeepSpeed's zero_to_fp32.py "
                                  "for a ZeRO-3 one), then save and resume with ds_zo")
        raise CheckpointError(f"checkpoint {folder!r} is incomplete: zo_state.json is missing")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder!r}: zo_state.json is corrupt ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder!r} is not a {FORMAT} checkpoint")
    steps = os.path.join(folder, "steps.jsonl")
    if not os.path.isfile(steps) or _sha256(steps) != state["steps_sha256"]:
        raise CheckpointError(f"checkpoint {folder!r}: steps.jsonl is missing or does not match its checksum")
    return folder, state


def read_steps(folder: str) -> list[StepRecord]:
    from .replay import read_step_log
    return read_step_log(os.path.join(folder, "steps.jsonl"))


def has_latest(comm, load_dir: str) -> bool:
    """Whether load_dir holds a checkpoint ('latest'), decided by every rank together (a collective: every rank
    calls it): ranks that disagree are named on each, since those that loaded and those that went on from the model
    as it is would train different models."""
    found = comm.gather_strings("1" if os.path.isfile(os.path.join(load_dir, "latest")) else "0",
                                what="agreement on whether a checkpoint is there to load (every rank must take part)")
    if "1" in found and "0" in found:
        raise CheckpointError(f"ranks {[r for r, f in enumerate(found) if f == '0']} see no checkpoint in "
                              f"{os.path.abspath(load_dir)!r} (no 'latest' file) and ranks "
                              f"{[r for r, f in enumerate(found) if f == '1']} do: every rank must load the same "
                              "checkpoint (a folder on a file system all nodes share)")
    return "1" in found


def _verified(engine, load_dir: str, tag: Optional[str]):
    """The checkpoint read and checked against this engine, which is left as it is: (folder, state, step log, the
    copies that restore its tensors)."""
    folder, state = read_state(load_dir, tag)
    if state["model"] != model_fingerprint(engine):
        raise CheckpointError(f"checkpoint {folder!r} was saved from a different model: "
                              f"{_model_differences(state['model'], model_fingerprint(engine))}")
    layout = state["layout"]
    resliced = engine.resliced
    if layout["resliced"] != resliced or (resliced and (layout["world"], layout["partition"]) !=
                                          (engine.dims.world, engine.dims.partition)):
        raise CheckpointError(f"checkpoint {folder!r} holds ZeRO-3 shards for world {layout['world']} / partition "
                              f"{layout['partition']}; this run is world {engine.dims.world} / partition "
                              f"{engine.dims.partition}{'' if resliced else ' without reslicing'}")
    if sorted(engine.trainable_names) != state["trainable"]:
        raise CheckpointError(f"checkpoint {folder!r} trained another parameter set (zero_order.trainable)")
    # the step log is replayed with the checkpoint's distribution and rows: the steps after a resume must use them too
    saved_distribution = state.get("distribution", "gaussian")
    if saved_distribution != engine.zo_config.distribution:
        raise CheckpointError(f"checkpoint {folder!r} drew z from the {saved_distribution!r} distribution; this run "
                              f"uses {engine.zo_config.distribution!r} (zero_order.distribution): resume with "
                              f"{saved_distribution!r}")
    rows = {n: r.tolist() for n, r in engine.trainable_rows.items()}
    if state.get("trainable_rows", {}) != rows:
        raise CheckpointError(f"checkpoint {folder!r} trained other rows (zero_order.trainable_rows: saved "
                              f"{_brief(state.get('trainable_rows', {}))}, this run {_brief(rows)})")
    saved_base = state.get("base_weights") or {}     # checkpoints before the twelfth session have none
    frozen = [n for n in saved_base if n not in engine.trainable_names]
    other = differing(saved_base, engine.base_weights, frozen)
    if other:
        raise CheckpointError(f"checkpoint {folder!r} was trained from other base weights: {describe(other)} of this "
                              "model, which the checkpoint does not hold, differ from the run's: resume with the "
                              "model the run started from")
    # resliced: each rank's file holds its shards, and rank 0's also the parameters every rank holds whole
    tensors = _read_rank_file(folder, state, engine.global_rank if resliced else 0)
    if resliced and engine.global_rank != 0:     # (not rank 0's shards: 1/k of the offloaded layers)
        tensors.update(_read_rank_file(folder, state, 0, keep=lambda name: not name.endswith("@shard")))
    return folder, state, read_steps(folder), _restore_copies(engine, tensors, folder)


def load(engine, load_dir: str, tag: Optional[str] = None) -> tuple[Optional[str], Optional[dict]]:
    """ZOEngine.load_checkpoint: (folder, client state), or (None, None) where no tag is given and load_dir holds no
    'latest' (nothing saved there yet), as DeepSpeed returns, with its warning. The ranks decide together: one
    that loaded while another went on from the model as it is would train a different model."""
    if tag is None and not has_latest(engine.comm, load_dir):
        logger.warning("ds_zo: no checkpoint to load in %r (no 'latest' file there): nothing loaded, training starts "
                       "from the model as it is", os.path.abspath(load_dir))
        return None, None
    engine.flush()
    # read and check on every rank before any rank changes anything: a rank that cannot (its own shard file corrupt,
    # the folder not shared) stops them all, with the model as it was
    folder, state, steps, copies = together(engine.comm, f"loading checkpoint {tag or 'latest'!r} from "
                                             f"{os.path.abspath(load_dir)!r}",
                                             lambda: _verified(engine, load_dir, tag))
    with torch.no_grad():
        for dst, t in copies:
            dst.copy_(t)
    engine.optimizer.step_log = steps
    saved_base = state.get("base_weights") or {}
    # the run's base, carried on to later checkpoints (their replay needs it): this model's trained parameters may
    # already hold fine-tuned values, so where the checkpoint has no base (saved before the field, or a model
    # partitioned before initialize) theirs is unknown
    engine.base_weights = {n: saved_base.get(n) or (None if n in engine.trainable_names else h)
                           for n, h in engine.base_weights.items()}
    engine.optimizer.pending = None
    saved_stream = state.get("z_stream", engine.z_stream)
    if saved_stream != engine.z_stream and engine.zo_config.z_sampler == "auto" and "(" not in saved_stream:
        # the default sampler resumes on the one the run drew with, where it can draw here: GPUs drew chunk by chunk
        # until the sixteenth session and counter-based since; an explicit zero_order.z_sampler is kept
        engine.use_sampler(parse_z_stream(saved_stream)[1])
    if saved_stream != engine.z_stream:
        # training goes on (z is as random here), but no single device can replay the whole step log any more
        logger.warning("ds_zo: resuming a run that drew z on %s on %s: its step log now mixes two z streams and "
                       "ds_zo.replay will refuse it", saved_stream, engine.z_stream)
        engine.z_stream = f"mixed({saved_stream}, {engine.z_stream})"
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    engine._consecutive_skips = state.get("consecutive_skips", 0)     # (checkpoints before the field: 0)
    # the optimizer's state is restored, as DeepSpeed restores it: lr and weight_decay (the steps record the groups'
    # values, so the step log follows); eps stays the config's, which the engine perturbs with
    # values of this run's groups that the checkpoint's replace are said, once each; an lr that a scheduler set (here
    # at its start, there at its step) is the schedule's, restored with it below, not a config's value replaced
    scheduled = engine.lr_scheduler is not None and state["lr_scheduler"] is not None
    restored = []
    for group, saved in zip(engine.optimizer.param_groups, state["param_groups"]):
        saved = {k: v for k, v in saved.items() if k != "eps"}
        restored += [f"{k} {v!r} (this run's {group[k]!r})" for k, v in saved.items()
                     if k in group and group[k] != v and not (scheduled and k == "lr")]
        group.update(saved)
    engine.optimizer.groups_changed()
    for key, now in (("eps", engine.eps), ("num_perturbations", engine.zo_config.num_perturbations)):
        if state.get(key, now) != now:      # (checkpoints before the fields: not known)
            logger.warning("ds_zo: the checkpoint's run trained with %s %r; this run goes on with the config's %r",
                           key, state[key], now)
    if restored:
        logger.warning("ds_zo: the checkpoint's optimizer state replaces this run's: %s",
                       "; ".join(dict.fromkeys(restored)))
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    elif engine.lr_scheduler is not None:
        logger.warning("ds_zo: the checkpoint's run had no lr scheduler and the config has one: its schedule starts "
                       "from its own first step at step %d", engine.global_steps)
    elif state["lr_scheduler"] is not None:
        logger.warning("ds_zo: the checkpoint's run had an lr scheduler and the config has none: the lr stays at the "
                       "checkpoint's (%s) from step %d on", [g["lr"] for g in engine.optimizer.param_groups],
                       engine.global_steps)
    engine.comm.barrier()
    return folder, state["client_state"]


def _read_rank_file(folder: str, state: dict, rank: int, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors of rank `rank`'s file whose names `keep` accepts, after checking the file's checksum."""
    from safetensors import safe_open
    rank_file = f"zo_rank_{rank:05d}.safetensors"
    path = os.path.join(folder, rank_file)
    if not os.path.isfile(path) or _sha256(path) != state["files"].get(rank_file):
        raise CheckpointError(f"checkpoint {folder!r}: {rank_file} is missing or does not match its checksum")
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys() if keep(name)}


def _restore_copies(engine, tensors: dict[str, torch.Tensor], folder: str) -> list:
    """(destination, saved tensor) for every trained parameter (its shard under reslicing), each checked to fit."""
    shards = {}
    if engine.resliced:
        for su in engine.pipeline.order:
            shards.update({id(p): (su, i) for i, p in enumerate(su.params)})
    expected, copies = set(), []
    for n, p in engine.module.named_parameters():
        if n not in engine.trainable_names:
            continue
        key = f"{n}@shard" if id(p) in shards else n
        expected.add(key)
        if key not in tensors:
            raise CheckpointError(f"checkpoint {folder!r} lacks parameter {key!r}")
        t = tensors[key]
        if id(p) in shards:
            su, i = shards[id(p)]
            o = su.shard_offsets[i]
            dst = su.flat[o:o + su.shard_numels[i]]
        else:
            dst = p.data
        if t.shape != dst.shape or t.dtype != dst.dtype:
            raise CheckpointError(f"checkpoint {folder!r}: {key} has shape {tuple(t.shape)} {t.dtype}, the model "
                                  f"expects {tuple(dst.shape)} {dst.dtype}")
        copies.append((dst, t))
    extra = set(tensors) - expected
    if extra:
        raise CheckpointError(f"checkpoint {folder!r} holds unknown parameters {sorted(extra)[:3]}")
    return copies
