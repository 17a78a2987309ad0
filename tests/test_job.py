"""The fine-tuning job end to end on the tiny model and a user CSV: launchers, outputs, resume, replay, reload."""
import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from ds_zo.parallel.local_ranks import ROOT, free_port, loopback_env

pytestmark = pytest.mark.multiprocess
GOOD = "good great fine nice best love well".split()
BAD = "bad worst never no not poor hate".split()


def _write_csv(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(GOOD if label else BAD, 3) + rng.sample("the a movie film it was and".split(), 3)
            rng.shuffle(words)
            w.writerow([" ".join(words), label])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    _write_csv(d / "train.csv", 64, 1)
    _write_csv(d / "test.csv", 32, 2)
    return d


# the job, stopped (KeyboardInterrupt) as its final evaluation starts: after its last step, before anything else
_STOPPED_IN_FINAL_EVALUATION = """
import sys
from ds_zo import evaluation, train
evaluate = evaluation.evaluate
def stopping(engine, *args, **kwargs):
    if engine.global_steps == int(sys.argv[sys.argv.index("--steps") + 1]):
        raise KeyboardInterrupt("stopped in the final evaluation")
    return evaluate(engine, *args, **kwargs)
evaluation.evaluate = stopping
train.main(sys.argv[1:])
"""


def _job(out, data, *extra, launcher=None, steps=4, accelerator="cpu", stopped_in_final_evaluation=False):
    args = ["-m", "ds_zo.train", "--model", "tiny", "--task", "classification",
            "--train_file", str(data / "train.csv"), "--test_file", str(data / "test.csv"),
            "--label_words", '[" bad", " good"]', "--steps", str(steps), "--eval_interval", "2",
            "--output_dir", str(out), "--no_progress", "--deepspeed_config",
            os.path.join(ROOT, "configs", "tiny_classification.json"), *extra]
    env = loopback_env(DS_ACCELERATOR=accelerator)
    if os.environ.get("PYTHONPATH"):        # packages carried that way (the GPU machine's deepspeed wheels)
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
    if launcher == "torchrun":
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    elif launcher == "deepspeed":
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "--module", *args[1:]]
    elif stopped_in_final_evaluation:
        cmd = [sys.executable, "-c", _STOPPED_IN_FINAL_EVALUATION, *args[2:]]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)


def _final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_job_under_launchers_writes_everything(tmp_path, data, launcher):
    out = tmp_path / "run"
    proc = _job(out, data, "--deepspeed_config", os.path.join(ROOT, "configs", "tiny_classification_pertp2.json"),
                launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["perturbation_parallel"] == 2 and summary["steps"] == 4
    for key in ("zero_shot_test", "final_test", "final_dev"):
        assert 0.0 <= summary["results"][key]["accuracy"] <= 1.0
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest").read_text() == "global_step4"
    assert len((out / "steps.jsonl").read_text().splitlines()) == 4
    monitor = {f for _, _, fs in os.walk(out / "monitor") for f in fs}
    assert "Train_Samples_train_loss.csv" in monitor
    assert "zero-shot test accuracy" in proc.stdout and "fine-tuned test accuracy" in proc.stdout


@pytest.mark.timeout(600)
def test_resume_replay_and_plain_transformers_reload(tmp_path, data):
    whole = tmp_path / "whole"
    proc = _job(whole, data, steps=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = tmp_path / "part"
    proc = _job(part, data, "--save_interval", "3", steps=3)        # "interrupted" after 3 steps
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _job(part, data, steps=6)                                 # --resume auto picks up checkpoints/latest
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    a, b = _final_weights(whole), _final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_whole = (whole / "steps.jsonl").read_text()
    assert steps_whole == (part / "steps.jsonl").read_text()
    # stopped in its final evaluation (minutes long on the default job), a job has saved its training: the checkpoint
    # used to be written after that evaluation, and such a stop lost every step
    stopped = tmp_path / "stopped"
    proc = _job(stopped, data, steps=6, stopped_in_final_evaluation=True)
    assert proc.returncode != 0 and "stopped in the final evaluation" in proc.stderr, proc.stderr[-3000:]
    assert (stopped / "checkpoints" / "latest").read_text() == "global_step6"
    proc = _job(stopped, data, steps=6)
    assert proc.returncode == 0 and "nothing to train" in proc.stdout, proc.stderr[-3000:]
    assert (stopped / "steps.jsonl").read_text() == steps_whole
    assert json.loads((stopped / "summary.json").read_text())["results"] == \
        json.loads((whole / "summary.json").read_text())["results"]
    # --resume may name one tag folder; a checkpoint of another job (here: another data order) is refused
    tagged = tmp_path / "tagged"
    proc = _job(tagged, data, "--resume", str(part / "checkpoints" / "global_step3"), steps=6)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert (tagged / "steps.jsonl").read_text() == steps_whole
    proc = _job(part, data, "--seed", "9", steps=8)
    assert proc.returncode != 0
    assert "holds a checkpoint of another job (seed: saved 0, now 9)" in proc.stderr, proc.stderr[-2000:]
    # replay: base model + step log alone rebuild the fine-tuned weights
    rebuilt = tmp_path / "rebuilt"
    proc = subprocess.run([sys.executable, "-m", "ds_zo.replay", "--checkpoint", str(whole / "checkpoints"),
                           "--model", "tiny", "--output", str(rebuilt)], cwd=ROOT, env=loopback_env(),
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    c = load_file(os.path.join(rebuilt, "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    # plain transformers loads the saved model (no ds_zo) and gives the logits the fine-tuned weights give
    from transformers import AutoModelForCausalLM
    from ds_zo.models import tiny_model_and_tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(whole / "final", local_files_only=True).eval()
    model, tok = tiny_model_and_tokenizer()
    model.load_state_dict(a, strict=False)
    ids = tok("the movie was good", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    base, _ = tiny_model_and_tokenizer()
    with torch.no_grad():
        assert not torch.equal(reloaded(ids).logits, base(ids).logits)    # fine-tuning changed something


def test_bad_paths_and_rows_fail_clearly(tmp_path, data):
    proc = _job(tmp_path / "x", type(data)(tmp_path / "missing"))
    assert proc.returncode == 2 and "--train_file" in proc.stderr and "no such file" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("text,label\nfine film,1\nawful,7\n")
    (bad / "test.csv").write_text("text,label\nok,1\n")
    # an input the job cannot use ends it with its message and status 2, as a bad option does: no traceback
    proc = _job(tmp_path / "y", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "[ds_zo] error: " in proc.stderr and "train.csv, row 2" in proc.stderr and "'7'" in proc.stderr
    proc = _job(tmp_path / "z", data, "--label_words", '[" bad", " superlative"]')
    assert proc.returncode == 2 and "superlative" in proc.stderr and "Traceback" not in proc.stderr
    small = tmp_path / "small"
    small.mkdir()
    (small / "train.csv").write_text("text,label\nfine film,1\nawful,0\nok,1\n")
    (small / "test.csv").write_text("text,label\nok,1\n")
    proc = _job(tmp_path / "s", small)
    assert proc.returncode != 0 and "fewer than one global batch of 8" in proc.stderr, proc.stderr[-2000:]
    proc = _job(tmp_path / "v", data, "--task", "imdb")
    assert proc.returncode == 2 and "--train_file, --test_file: the imdb task uses its built-in data" in proc.stderr
    proc = _job(tmp_path / "u", data, "--eval_batch_size", "0")
    assert proc.returncode == 2 and "--eval_batch_size must be >= 1, got 0" in proc.stderr
    bogus = tmp_path / "weights.bin"                  # a model the job cannot load: status 2 too (was a traceback)
    bogus.write_bytes(b"\0" * 16)
    proc = _job(tmp_path / "m", data, "--model", str(bogus))
    assert proc.returncode == 2 and "a file that is not .gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_launch_scripts_take_paths_from_where_they_run(tmp_path, data):
    """launch/torchrun.sh (and the scripts sharing launch/common.sh) no longer cd into the repository: a user's
    relative --train_file and --output_dir are read and written where the user runs it."""
    (tmp_path / "mine").mkdir()
    for name in ("train.csv", "test.csv"):
        (tmp_path / "mine" / name).write_bytes((data / name).read_bytes())
    env = loopback_env(NPROC="1", PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "--model", "tiny",
                           "--task", "classification", "--train_file", "mine/train.csv", "--test_file",
                           "mine/test.csv", "--label_words", '[" bad", " good"]', "--steps", "1", "--eval_interval",
                           "0", "--output_dir", "runs/one", "--no_progress", "--deepspeed_config",
                           os.path.join(ROOT, "configs", "tiny_classification.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "one" / "final" / "model.safetensors").is_file()
