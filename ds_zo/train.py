"""The ZO fine-tuning job.

    python -m ds_zo.train [--deepspeed_config configs/smollm2_imdb.json] [--model smollm2] [--task imdb] ...

Runs under `python`, `deepspeed`, `torchrun` and `mpirun` like any DeepSpeed program (see launch/). Default: the
built-in SmolLM2-135M-Instruct on the built-in IMDB sentiment task, prompt "<review> It was" with label words
" terrible" / " great", ZO on the label-word rows of the tied embedding. It evaluates zero-shot first, every
--eval_interval steps and at the end; writes checkpoints (resumable, exactly), the final model (save_pretrained,
safetensors), the step log, a PNG plot, DeepSpeed monitor CSVs and a summary JSON into --output_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Optional

import torch

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "smollm2_imdb.json")
DEFAULT_MAX_LENGTH = 256


def parse_args(argv=None) -> argparse.Namespace:
    import deepspeed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (built-in SmolLM2-135M-Instruct), 'tiny' (random tiny Llama), a local HF "
                        "checkpoint directory, or a .gguf file")
    p.add_argument("--task", default="imdb", choices=["imdb", "classification", "lm"],
                   help="imdb: built-in sentiment; classification: your CSV/JSONL (text, label); "
                        "lm: prompt/completion JSONL")
    p.add_argument("--train_file", help="classification / lm: training data (.csv, .tsv or .jsonl)")
    p.add_argument("--dev_file", help="evaluated during training (default: a held-out 10%% of --train_file)")
    p.add_argument("--test_file", help="evaluated zero-shot and at the end (default: the dev set)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--label_values", default="0,1", help="comma-separated label values, class order (e.g. 0,1 or "
                                                          "negative,positive)")
    p.add_argument("--prompt_column", default="prompt")
    p.add_argument("--completion_column", default="completion")
    p.add_argument("--template", default="{text} It was", help="classification prompt; {text} is the input")
    p.add_argument("--label_words", default='[" terrible", " great"]',
                   help="JSON list of single-token label words, class order")
    p.add_argument("--train_examples", type=int, default=1000, help="imdb: training split size")
    p.add_argument("--dev_examples", type=int, default=200, help="imdb: dev split size")
    p.add_argument("--test_examples", type=int, default=500, help="imdb: test split size")
    p.add_argument("--max_chars", type=int, default=400, help="imdb: drop reviews longer than this")
    p.add_argument("--max_length", type=int, default=None,
                   help=f"tokens per example (prompts are cut at the front); default {DEFAULT_MAX_LENGTH}, or the "
                        "model's number of positions where that is fewer")
    p.add_argument("--trainable", default="auto",
                   help="'auto' (classification: the label-word rows of the output embedding, which score the "
                        "classes, or every parameter where the config offloads parameters; lm: everything), "
                        "'all', or comma-separated parameter-name patterns; overrides the config's choice")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval_interval", type=int, default=40)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--save_interval", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    p.add_argument("--output_dir", default="outputs/zo_finetune")
    p.add_argument("--seed", type=int, default=None, help="data order and zero_order.seed (default: the config's)")
    p.add_argument("--resume", default="auto", help="'auto' (resume from OUTPUT_DIR/checkpoints if present), "
                                                    "'no', a checkpoint folder (its latest tag) or one tag folder in "
                                                    "it; a checkpoint of another job (model, data, task settings, "
                                                    "seed or batch differ) is refused")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepscale_config and args.deepspeed_config:
        p.error("--deepscale_config and --deepspeed_config: give one (--deepscale_config is DeepSpeed's old name)")
    if not args.deepspeed_config:
        args.deepspeed_config = args.deepscale_config or DEFAULT_CONFIG   # (DeepSpeed reads the old name too)
    try:
        args.label_words = json.loads(args.label_words)
        assert isinstance(args.label_words, list) and all(isinstance(w, str) for w in args.label_words)
    except (json.JSONDecodeError, AssertionError):
        p.error(f"--label_words must be a JSON list of strings, e.g. '[\" no\", \" yes\"]', got {args.label_words!r}")
    if args.task in ("classification", "lm") and not args.train_file:
        p.error(f"--task {args.task} needs --train_file")
    for name in ("train_file", "dev_file", "test_file", "deepspeed_config"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            p.error(f"--{name} {path!r}: no such file")
    if args.steps < 0 or args.eval_interval < 0 or args.save_interval < 0:
        p.error("--steps, --eval_interval and --save_interval must be >= 0")
    for name in ("train_examples", "dev_examples", "test_examples", "max_chars"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 2:
        p.error(f"--max_length must be >= 2 (a prompt token and a label token), got {args.max_length}")
    values = [v.strip() for v in args.label_values.split(",")]
    if "" in values or len(set(values)) != len(values):
        p.error(f"--label_values must name each class once, comma-separated, got {args.label_values!r}")
    if args.task == "classification" and len(values) != len(args.label_words):
        p.error(f"--label_values has {len(values)} classes ({args.label_values!r}) but --label_words has "
                f"{len(args.label_words)} ({args.label_words!r}): give one label word per class, in the same order")
    if args.resume == "no" and os.path.isfile(os.path.join(args.output_dir, "checkpoints", "latest")):
        p.error(f"--resume no: {os.path.join(args.output_dir, 'checkpoints')} holds an earlier run's checkpoints, "
                "which a new run there would mix with its own; use another --output_dir, continue that run with "
                "--resume auto, or remove the folder")
    if args.resume not in ("auto", "no"):
        _check_resume_path(p, args.resume, args.output_dir)
    if args.eval_batch_size < 1:
        p.error(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    if args.task == "imdb":
        given = [f"--{n}" for n in ("train_file", "dev_file", "test_file") if getattr(args, n)]
        if given:
            p.error(f"{', '.join(given)}: the imdb task uses its built-in data; pass --task classification (or lm) "
                    "to train on your files")
    return args


def _check_resume_path(p, path: str, output_dir: str) -> None:
    """--resume PATH: a checkpoint folder (or tag) that exists, and an --output_dir that holds no other run's
    checkpoints (continuing PATH there would put its checkpoints, step log and monitor rows beside that run's)."""
    if not os.path.isdir(path):
        p.error(f"--resume {path!r}: no such folder (give a checkpoint folder, such as OUTPUT_DIR/checkpoints, or "
                "one tag folder in it)")
    if not os.path.isfile(os.path.join(path, "latest")) and not os.path.isfile(os.path.join(path, "zo_state.json")) \
            and os.path.isfile(os.path.join(path, "checkpoints", "latest")):
        p.error(f"--resume {path!r} is a job's output folder: its checkpoints are in "
                f"{os.path.join(path, 'checkpoints')!r}")
    here = os.path.join(output_dir, "checkpoints")
    if os.path.isfile(os.path.join(here, "latest")) and \
            os.path.realpath(checkpoint_location(path)[0]) != os.path.realpath(here):
        p.error(f"--resume {path!r}: --output_dir's {here!r} holds another run's checkpoints, and continuing "
                f"{path!r} there would mix the two runs' checkpoints, step logs and monitor files; use an "
                "--output_dir without checkpoints for it, or continue the run there with --resume auto")


# -- data ---------------------------------------------------------------------------------------------------------
def _split(examples: list, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(examples) // 10)
    return [examples[i] for i in order[cut:]], [examples[i] for i in order[:cut]]


def resolve_max_length(given: Optional[int], model) -> int:
    """--max_length, or the default cut to the model's positions (absolute position embeddings such as GPT-2's and
    OPT's have no row past them); a length beyond them that the user asked for is refused."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if given is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit and given > limit:
        raise SystemExit(f"[ds_zo] --max_length {given}: the model has {limit} positions "
                         f"({type(model.config).__name__}); pass --max_length {limit} or less")
    return given


def build_data(args, tokenizer, seed: int):
    """(train, dev, test encoded examples, candidate label ids or None, task description)."""
    from .data import files, imdb, tasks
    if args.task == "lm":
        read = lambda f: files.read_prompt_completion(f, args.prompt_column, args.completion_column)  # noqa: E731
        train = read(args.train_file)
        dev = read(args.dev_file) if args.dev_file else None
        if dev is None:
            train, dev = _split(train, seed)
        test = read(args.test_file) if args.test_file else dev
        enc = lambda ex: tasks.encode_prompt_completion(tokenizer, ex, args.max_length)  # noqa: E731
        return enc(train), enc(dev), enc(test), None, f"prompt/completion LM on {args.train_file}"
    task = tasks.PromptClassification(args.template, tuple(args.label_words))
    if args.task == "imdb":
        splits = imdb.imdb_splits(args.train_examples, args.dev_examples, args.test_examples, args.max_chars, seed=0)
        train, dev, test = splits["train"], splits["dev"], splits["test"]
        what = "IMDB sentiment (built-in)"
    else:
        values = [v.strip() for v in args.label_values.split(",")]
        read = lambda f: files.read_labelled(f, args.text_column, args.label_column, values)  # noqa: E731
        train = read(args.train_file)
        dev = read(args.dev_file) if args.dev_file else None
        if dev is None:
            train, dev = _split(train, seed)
        test = read(args.test_file) if args.test_file else dev
        what = f"classification on {args.train_file}"
    enc = lambda ex: task.encode(tokenizer, ex, args.max_length)  # noqa: E731
    return enc(train), enc(dev), enc(test), task.label_token_ids(tokenizer), what


def job_fingerprint(args, seed: int, global_rows: int) -> dict:
    """What makes a run this run: a checkpoint of another job in the same output folder must not be resumed (its
    steps, history and zero-shot results would be taken for this job's)."""
    import hashlib
    files = {}
    for name in ("train_file", "dev_file", "test_file"):
        path = getattr(args, name)
        if path:
            with open(path, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()[:16]
    keys = ("model", "task", "template", "label_words", "label_values", "text_column", "label_column", "prompt_column",
            "completion_column", "train_examples", "dev_examples", "test_examples", "max_chars", "max_length",
            "trainable")
    return {**{k: getattr(args, k) for k in keys}, "data": files, "seed": seed, "global_batch": global_rows}


def checkpoint_location(path: str) -> tuple[str, Optional[str]]:
    """(checkpoint directory, tag) for --resume: a directory with a `latest` file, or one tag folder in it."""
    if not os.path.isfile(os.path.join(path, "latest")) and os.path.isfile(os.path.join(path, "zo_state.json")):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    return path, None


def _same_setting(key: str, value):
    """A setting as it names the job: a model folder or .gguf file by its real path (relative or absolute, with or
    without a trailing slash: the same model), the class values without the spaces around their commas."""
    if key == "model" and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    if key == "label_values" and isinstance(value, str):
        return ",".join(v.strip() for v in value.split(","))
    return value


def check_same_job(saved: Optional[dict], current: dict, where: str, named: bool = False) -> None:
    """named: the checkpoint was named by --resume (not found in --output_dir), so the advice differs."""
    if saved is None:
        return                  # a checkpoint from before jobs were fingerprinted
    differ = [f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in current
              if _same_setting(k, saved.get(k)) != _same_setting(k, current[k])]
    if differ:
        from .checkpoint import CheckpointError
        advice = ("Continue that run with its settings, or resume a checkpoint of this job" if named else
                  "Use another --output_dir, or the same settings to continue that run, or remove that folder to "
                  "start this one there")
        raise CheckpointError(f"{where} holds a checkpoint of another job ({'; '.join(differ)}): resuming it would "
                              f"mix that run's steps and results into this one. {advice}")


def step_examples(train: list, step: int, global_rows: int, seed: int) -> list:
    """The examples of global batch `step`: consecutive slices of a per-epoch shuffle (a function of the step alone,
    so a resumed run sees exactly the batches the uninterrupted one would have)."""
    per_epoch = max(1, len(train) // global_rows)
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(train)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [train[i] for i in order[index * global_rows:(index + 1) * global_rows]]


# -- config -------------------------------------------------------------------------------------------------------
def job_config(args, model, candidate_ids, seed) -> dict:
    from .config import load_config, split_config
    cfg = load_config(args.deepspeed_config)
    zo = cfg.setdefault("zero_order", {})
    if args.seed is not None:
        zo["seed"] = seed
    if args.trainable == "auto":
        offloaded = split_config(cfg)[3].enabled   # rows cannot be offloaded (yet)
        if "trainable" not in zo and "trainable_rows" not in zo and candidate_ids is not None and not offloaded:
            # the rows that score the classes: the output layer's (the input embedding's too where they are tied;
            # an untied input embedding's rows only feed the prompt's last position, which nothing scores)
            head = (model.get_output_embeddings() or model.get_input_embeddings()).weight
            name = next(n for n, p in model.named_parameters() if p is head)
            zo["trainable_rows"] = {name: list(candidate_ids)}
    else:
        zo.pop("trainable_rows", None)
        zo["trainable"] = [] if args.trainable == "all" else [s.strip() for s in args.trainable.split(",")]
    cfg.setdefault("csv_monitor", {"enabled": True, "output_path": os.path.join(args.output_dir, "monitor"),
                                   "job_name": "zo"})
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


# -- the job ------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    from .output_lock import output_dir_lock
    from .parallel.launch_env import ensure_launch_env
    ensure_launch_env()
    rank0 = os.environ.get("RANK", "0") == "0"
    with output_dir_lock(args.output_dir, hold=rank0):
        return _run(args, rank0)


def _run(args, rank0: bool) -> dict:
    from . import initialize
    from .data.collate import collate, pad_token_id, takes_position_ids
    from .evaluation import evaluate
    from .models import load_model_and_tokenizer
    from .replay import write_step_log
    from .report import continue_csv_monitor, plot_history, write_summary

    log = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    t_start = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model)
    from .config import load_config
    seed = args.seed if args.seed is not None else load_config(args.deepspeed_config).get("zero_order", {}).get("seed", 0)
    args.max_length = resolve_max_length(args.max_length, model)
    train, dev, test, candidates, what = build_data(args, tokenizer, seed)
    cfg = job_config(args, model, candidates, seed)
    from .loss import LabelWordLoss
    engine, _, _, _ = initialize(args=argparse.Namespace(local_rank=args.local_rank), model=model, config=cfg,
                                 loss_fn=LabelWordLoss(candidates) if candidates is not None else None)
    pad = pad_token_id(tokenizer)
    positions = takes_position_ids(engine.module)
    trained = sum(len(r) * engine.module.get_parameter(n)[0].numel() for n, r in engine.trainable_rows.items())
    trained += sum(getattr(p, "ds_numel", p.numel()) for n, p in engine.module.named_parameters()   # ZeRO-3: full
                   if n in engine.trainable_names and n not in engine.trainable_rows)
    global_rows = engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps() * engine.dp_world_size
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    log(f"[ds_zo] {what}: {len(train)} train / {len(dev)} dev / {len(test)} test examples; model {args.model}; "
        f"{trained:,} trainable parameters; world {engine.dims.world} (dp {engine.dp_world_size} x perturbation "
        f"parallel {engine.dims.pertp}); global batch {global_rows}")

    if len(train) < global_rows:
        raise SystemExit(f"[ds_zo] {len(train)} training examples ({args.train_file or args.task}) are fewer than one "
                         f"global batch of {global_rows}: use more data or a smaller train_micro_batch_size_per_gpu")
    job = job_fingerprint(args, seed, global_rows)
    history = {"train": [], "eval": []}
    results = {}
    resume_from = None
    from .checkpoint import check_shared_folder, has_latest
    check_shared_folder(engine.comm, engine.global_rank, args.output_dir, "--output_dir")
    if args.resume == "auto" and has_latest(engine.comm, ckpt_dir):        # (every rank decides the same)
        resume_from = ckpt_dir
    elif args.resume not in ("auto", "no"):
        resume_from = args.resume
    if resume_from:
        from .checkpoint import read_state, together
        load_dir, tag = checkpoint_location(resume_from)
        # every rank reads it, together: one that cannot (a folder its node does not share) stops them all at once
        together(engine.comm, f"reading the checkpoint in {resume_from!r}",
                 lambda: check_same_job(read_state(load_dir, tag)[1]["client_state"].get("job"), job, resume_from,
                                        named=resume_from != ckpt_dir))
        _, client = engine.load_checkpoint(load_dir, tag)
        history, results = client.get("history", history), client.get("results", results)
        log(f"[ds_zo] resumed from {resume_from} at step {engine.global_steps}")
        continue_csv_monitor(engine, engine.global_samples)
        if engine.global_steps >= args.steps:
            log(f"[ds_zo] the checkpoint is at step {engine.global_steps}, not before --steps {args.steps}: nothing "
                "to train; the final evaluation runs again")
    else:
        aside = continue_csv_monitor(engine, None)
        if aside:
            log(f"[ds_zo] the monitor files of an earlier run that left no checkpoint here moved to {aside}")
        results["zero_shot_test"] = evaluate(engine, test, args.eval_batch_size, pad, candidates)
        results["zero_shot_dev"] = evaluate(engine, dev, args.eval_batch_size, pad, candidates)
        history["eval"].append([0, results["zero_shot_dev"]])
        log(f"[ds_zo] zero-shot: test {_fmt(results['zero_shot_test'])}, dev {_fmt(results['zero_shot_dev'])}")

    shard = slice(engine.dp_rank * (global_rows // engine.dp_world_size),
                  (engine.dp_rank + 1) * (global_rows // engine.dp_world_size))
    bar = None
    if rank0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=engine.global_steps, desc="ZO fine-tune", file=sys.stdout,
                   dynamic_ncols=True)
    tokens, t_train, steps_at_start = 0, time.time(), engine.global_steps
    forwards = 2 * engine.zo_config.num_perturbations
    while engine.global_steps < args.steps:
        step = engine.global_steps
        examples = step_examples(train, step, global_rows, seed)
        # label words last: logits for one position only; positions counted from each row's first real token
        batch = collate(examples[shard], pad, side="left", position_ids=positions)
        loss = engine.train_batch(batch)
        tokens += forwards * sum(len(e["input_ids"]) for e in examples)    # every perturbed forward
        history["train"].append([step + 1, loss])
        done = engine.global_steps
        if args.eval_interval and done % args.eval_interval == 0 and done < args.steps:
            history["eval"].append([done, evaluate(engine, dev, args.eval_batch_size, pad, candidates)])
        if args.save_interval and done % args.save_interval == 0 and done < args.steps:
            engine.save_checkpoint(ckpt_dir, client_state={"history": history, "results": results, "job": job})
        if bar is not None:
            last = history["eval"][-1][1]
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens / (time.time() - t_train):.0f}"}
            if "accuracy" in last:
                post["dev_acc"] = f"{100 * last['accuracy']:.1f}%"
            bar.set_postfix(post)
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t_train
    if engine.global_steps > steps_at_start:
        # the trained state first: the final evaluation takes minutes, and a job stopped there kept nothing of its
        # training (saved again below with the final results)
        engine.save_checkpoint(ckpt_dir, client_state={"history": history, "results": results, "job": job})

    results["final_dev"] = evaluate(engine, dev, args.eval_batch_size, pad, candidates)
    results["final_test"] = evaluate(engine, test, args.eval_batch_size, pad, candidates)
    if not history["eval"] or history["eval"][-1][0] != engine.global_steps:
        history["eval"].append([engine.global_steps, results["final_dev"]])
    engine.save_checkpoint(ckpt_dir, client_state={"history": history, "results": results, "job": job})
    state = engine.module_state_dict()          # full parameters on every rank (a collective under ZeRO-3)
    final_dir = os.path.join(args.output_dir, "final")
    summary = {
        "task": what, "model": args.model, "steps": engine.global_steps, "trainable_parameters": trained,
        "device": engine.device.type, "world": engine.dims.world, "perturbation_parallel": engine.dims.pertp,
        "dp": engine.dp_world_size,
        "global_batch": global_rows, "results": results, "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        "total_seconds": time.time() - t_start, "deepspeed_config": cfg,
        "outputs": {"final_model": final_dir, "checkpoints": ckpt_dir, "plot": os.path.join(args.output_dir,
                                                                                             "training.png")},
    }
    if engine.global_rank == 0:
        module = engine.module
        module.save_pretrained(final_dir, state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()},
                               safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        write_step_log(os.path.join(args.output_dir, "steps.jsonl"), engine.step_log)
        plot_history(os.path.join(args.output_dir, "training.png"), history, f"ZO fine-tune: {what}")
        write_summary(os.path.join(args.output_dir, "summary.json"), summary)
        log(f"[ds_zo] zero-shot test {_fmt(results.get('zero_shot_test'))} -> fine-tuned test "
            f"{_fmt(results['final_test'])} after {engine.global_steps} steps ({train_seconds:.0f} s training)")
        log(f"[ds_zo] wrote {final_dir}, {ckpt_dir}, {args.output_dir}/summary.json and training.png")
    engine.comm.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()   # without it ranks often abort at exit
    return summary


def _fmt(result) -> str:
    if not result:
        return "n/a"
    if "accuracy" in result:
        return f"accuracy {100 * result['accuracy']:.1f}% (loss {result['loss']:.4f})"
    return f"loss {result['loss']:.4f}"


def cli(argv=None) -> None:
    """`python -m ds_zo.train`: an input the job cannot use (data, config, model, task settings, checkpoint, launch)
    ends it with its message and exit status 2, as argparse does, not a traceback; anything else keeps its traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.files import DataError
    from .data.tasks import TaskError
    from .model.units import UnitCutError
    from .models import ModelSpecError
    from .parallel.launch_env import LaunchError
    try:
        main(argv)
    except (CheckpointError, ConfigError, DataError, LaunchError, ModelSpecError, TaskError, UnitCutError) as error:
        print(f"[ds_zo] error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
