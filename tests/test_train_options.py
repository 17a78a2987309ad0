"""The job's choices that need no launch: what --trainable auto trains, --max_length against the model, option
checks, and the CSV monitor's files across a restart (the job end to end is tests/test_job.py)."""
import argparse
import csv
import json
import os

import pytest
import torch

import ds_zo
from ds_zo import train
from ds_zo.checkpoint import CheckpointError
from ds_zo.loss import LabelWordLoss
from ds_zo.models import tiny_model_and_tokenizer
from conftest import ds_config
from models import VOCAB, batch, tiny_model

LABEL_IDS = [5, 7]


def _config_file(tmp_path, cfg: dict) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _args(config_path: str, trainable: str = "auto") -> argparse.Namespace:
    """The job's options job_config reads; the output (the CSV monitor's folder) beside the config, in tmp_path."""
    return argparse.Namespace(deepspeed_config=config_path, seed=None, trainable=trainable,
                              output_dir=os.path.join(os.path.dirname(config_path), "out"))


@pytest.mark.parametrize("tied", [True, False])
def test_auto_trains_the_rows_that_score_the_classes(tmp_path, tied):
    """The label words are scored by the output layer: its rows are the ones trained (the input embedding's where
    they are tied). On an untied model the input embedding's rows feed only the prompt's last position, which no
    loss reads: L+ == L- and g == 0 at every step."""
    model = tiny_model("llama", tied=tied)
    cfg = train.job_config(_args(_config_file(tmp_path, ds_config(lr=1e-2, eps=1e-2))), model, LABEL_IDS, 0)
    expected = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert cfg["zero_order"]["trainable_rows"] == {expected: LABEL_IDS}
    engine, *_ = ds_zo.initialize(model=model, config=cfg, loss_fn=LabelWordLoss(LABEL_IDS))
    before = engine.module_state_dict()[expected].clone()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = torch.tensor(LABEL_IDS)
    for _ in range(2):
        engine.train_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        assert engine.last_projected_grad != 0.0
    after = engine.module_state_dict()[expected]
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == LABEL_IDS


def test_auto_trains_every_parameter_where_the_config_offloads(tmp_path):
    """Rows cannot be offloaded: with offload_param on, auto leaves the config's choice (every parameter), where it
    used to inject rows that initialize then refused, naming a field the user never set."""
    cfg = ds_config()
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "cpu"}}
    model = tiny_model("llama")
    out = train.job_config(_args(_config_file(tmp_path, cfg)), model, LABEL_IDS, 0)
    assert "trainable_rows" not in out["zero_order"] and "trainable" not in out["zero_order"]
    engine, *_ = ds_zo.initialize(model=model, config=out)
    assert engine.trainable_names == {n for n, _ in tiny_model("llama").named_parameters()}


def test_max_length_is_cut_to_the_models_positions_or_refused_when_asked_for():
    gpt2 = tiny_model("gpt2")                                     # 64 absolute positions
    assert train.resolve_max_length(None, gpt2) == 64
    assert train.resolve_max_length(32, gpt2) == 32
    with pytest.raises(SystemExit, match=r"--max_length 100: the model has 64 positions \(GPT2Config\); pass "
                                         r"--max_length 64 or less"):
        train.resolve_max_length(100, gpt2)
    model, _ = tiny_model_and_tokenizer()                           # 1024 positions
    assert train.resolve_max_length(None, model) == train.DEFAULT_MAX_LENGTH


@pytest.mark.parametrize("argv, message", [
    (["--max_length", "1"], "--max_length must be >= 2"),
    (["--dev_examples", "-1"], "--dev_examples must be >= 1, got -1"),
    (["--task", "classification", "--train_file", __file__, "--label_values", "0,0"],
     "--label_values must name each class once"),
    (["--task", "classification", "--train_file", __file__, "--label_values", "0,,1"],
     "--label_values must name each class once"),
    (["--task", "classification", "--train_file", __file__, "--label_values", "0,1,2"],    # (was a traceback)
     "--label_values has 3 classes ('0,1,2') but --label_words has 2"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resume_no_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    """A fresh run beside an earlier run's checkpoints would mix the two (its `latest`, their tags, the monitor)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("global_step6")
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "no", "--output_dir", str(tmp_path)])
    assert "holds an earlier run's checkpoints" in capsys.readouterr().err
    assert train.parse_args(["--resume", "auto", "--output_dir", str(tmp_path)]).resume == "auto"


def test_the_same_job_spelled_otherwise_resumes_and_another_is_told_a_way_that_works(tmp_path, monkeypatch):
    """A model folder or .gguf file given relative or absolute (or with a trailing slash) and class values with spaces
    after the commas name the same job; another job is refused with advice that works there (it said --resume no,
    which that folder refuses: test_resume_no_refuses_a_folder_that_holds_a_run)."""
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"model": "model", "label_values": "0,1", "seed": 0}
    train.check_same_job(saved, {"model": str(tmp_path / "model") + "/", "label_values": "0, 1", "seed": 0}, "ck")
    with pytest.raises(CheckpointError, match=r"another job \(seed: saved 0, now 1\).*Use another --output_dir, or the "
                                         r"same settings to continue that run, or remove that folder") as stop:
        train.check_same_job(saved, {"model": "model", "label_values": "0,1", "seed": 1}, "ck")
    assert "--resume no" not in str(stop.value)
    with pytest.raises(CheckpointError, match=r"label_values: saved '0,1', now '1,0'"):
        train.check_same_job(saved, {"model": "model", "label_values": "1,0", "seed": 0}, "ck")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")       # a .gguf file too, not only a folder
    train.check_same_job({"model": "m.gguf"}, {"model": str(tmp_path / "m.gguf")}, "ck")


def test_deepscale_config_is_read_as_deepspeed_does(tmp_path, capsys):
    """DeepSpeed's older name for --deepspeed_config (its add_config_arguments lists both): it was ignored, and the
    default config trained."""
    cfg = tmp_path / "mine.json"
    cfg.write_text("{}")
    assert train.parse_args(["--deepscale_config", str(cfg)]).deepspeed_config == str(cfg)
    with pytest.raises(SystemExit):
        train.parse_args(["--deepscale_config", str(cfg), "--deepspeed_config", str(cfg)])
    assert "give one" in capsys.readouterr().err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_the_csv_monitor_keeps_one_run_per_folder(tmp_path):
    """DeepSpeed's CSV monitor appends: a resumed run drops what was written after its checkpoint and writes no
    second header; a fresh start sets an earlier run's files aside."""
    from ds_zo.report import continue_csv_monitor

    def engine():
        cfg = ds_config(micro=2)
        cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "zo"}
        return ds_zo.initialize(model=tiny_model("llama"), config=cfg)[0]

    first = engine()
    for t in range(3):
        first.train_batch(batch(seed=t))
    loss_csv = tmp_path / "zo" / "Train_Samples_train_loss.csv"
    assert [r[0] for r in _rows(loss_csv)] == ["step", "2", "4", "6"]
    first.destroy()
    resumed = engine()
    resumed.global_samples = 2                 # as load_checkpoint leaves it for a checkpoint after step 1
    assert continue_csv_monitor(resumed, resumed.global_samples) is None
    resumed.train_batch(batch(seed=1))
    assert [r[0] for r in _rows(loss_csv)] == ["step", "2", "4"]
    resumed.destroy()
    fresh = engine()
    aside = continue_csv_monitor(fresh, None)
    assert aside == str(tmp_path / "zo.earlier-1")
    assert [r[0] for r in _rows(os.path.join(aside, "Train_Samples_train_loss.csv"))] == ["step", "2", "4"]
    fresh.train_batch(batch(seed=0))
    assert [r[0] for r in _rows(loss_csv)] == ["step", "2"]


def test_resume_names_a_checkpoint_that_exists_and_no_other_run_is_continued_beside_it(tmp_path, capsys):
    """--resume PATH into an --output_dir that holds another run's checkpoints ran, and mixed the two: that run's
    `latest` then named this one's tag, its final model and step log were overwritten, and the CSV monitor files were
    stitched from both. A missing folder, or a job's output folder instead of its checkpoints, is named as such."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for out in (ours, theirs):
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "latest").write_text("global_step6")
        (out / "checkpoints" / "global_step6").mkdir()
        (out / "checkpoints" / "global_step6" / "zo_state.json").write_text("{}")

    def refused(*argv):
        with pytest.raises(SystemExit):
            train.parse_args(list(argv))
        return capsys.readouterr().err
    assert "holds another run's checkpoints" in refused("--resume", str(theirs / "checkpoints"),
                                                        "--output_dir", str(ours))
    assert "holds another run's checkpoints" in refused("--resume", str(theirs / "checkpoints" / "global_step6"),
                                                        "--output_dir", str(ours))
    assert "no such folder" in refused("--resume", str(tmp_path / "missing"), "--output_dir", str(ours))
    assert f"its checkpoints are in {str(theirs / 'checkpoints')!r}" in refused("--resume", str(theirs),
                                                                               "--output_dir", str(tmp_path / "new"))
    # its own checkpoints (an earlier tag: a rollback), or another run's into a folder without checkpoints: fine
    assert train.parse_args(["--resume", str(ours / "checkpoints"), "--output_dir", str(ours)]).resume
    assert train.parse_args(["--resume", str(theirs / "checkpoints"), "--output_dir", str(tmp_path / "new")]).resume


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys):
    """It failed in DeepSpeed's monitor set-up, with a traceback, after the model had loaded."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        train.cli(["--output_dir", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--output_dir {str(tmp_path / 'file' / 'out')!r}: cannot write there" in err, err


def test_another_checkpoints_advice_when_it_was_named_by_resume(tmp_path):
    """'remove that folder to start this one there' named someone else's checkpoint when --resume gave its path."""
    with pytest.raises(CheckpointError, match="Continue that run with its settings, or resume a checkpoint of this "
                                              "job$"):
        train.check_same_job({"seed": 0}, {"seed": 1}, "theirs", named=True)


def test_one_job_at_a_time_in_an_output_dir(tmp_path, capsys):
    """Two jobs in one folder (a requeue while the first still runs) deleted each other's half-written checkpoints:
    the second crashed with a FileNotFoundError from inside a save. Now it is refused at once, naming the first;
    the lock goes with the job that held it."""
    from ds_zo.output_lock import OutputDirInUse, output_dir_lock
    with output_dir_lock(str(tmp_path)):
        with pytest.raises(OutputDirInUse, match=rf"in use by another job \(pid {os.getpid()} on "):
            with output_dir_lock(str(tmp_path)):
                pass
        with output_dir_lock(str(tmp_path), hold=False):     # ranks other than 0 take no lock
            pass
        with pytest.raises(SystemExit) as stop:
            train.cli(["--output_dir", str(tmp_path)])
        assert stop.value.code == 2 and "is in use by another job" in capsys.readouterr().err
    with output_dir_lock(str(tmp_path)):                    # released
        pass
