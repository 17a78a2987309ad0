"""What a training job leaves behind for people: a PNG plot of training loss and evaluation accuracy, and a summary."""
from __future__ import annotations

import csv
import json
import os
from typing import Optional


def write_summary(path: str, summary: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def plot_history(path: str, history: dict, title: str) -> None:
    """history: {"train": [[step, loss], ...], "eval": [[step, {"loss":..., "accuracy":...}], ...]}."""
    import matplotlib
    matplotlib.use("Agg")   # no display; this only writes a file
    import matplotlib.pyplot as plt

    fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=110)
    if history["train"]:
        steps, losses = zip(*history["train"])
        window = max(1, len(losses) // 8)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, smooth, color="tab:blue", label=f"train loss ((L+ + L-)/2, mean of {window})")
    ax_loss.set_xlabel("ZO step")
    ax_loss.set_ylabel("loss", color="tab:blue")
    evals = [(s, e) for s, e in history["eval"] if e.get("accuracy") is not None]
    if evals:
        ax_acc = ax_loss.twinx()
        ax_acc.plot([s for s, _ in evals], [100 * e["accuracy"] for _, e in evals], "o-", color="tab:red",
                    label="dev accuracy (%)")
        ax_acc.set_ylabel("accuracy (%)", color="tab:red")
        ax_acc.legend(loc="upper right")
    ax_loss.legend(loc="upper left")
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def continue_csv_monitor(engine, resumed_at_samples: Optional[int]) -> Optional[str]:
    """Keep DeepSpeed's CSV monitor files (OUTPUT_DIR/monitor/<job>/*.csv, which it appends to) those of one run.
    A fresh start sets an earlier run's files aside (returns where); a resumed run drops the rows written after its
    checkpoint (steps a crash lost, which it trains again) and goes on without a second header row. Does nothing
    where DeepSpeed keeps no monitor files (ranks other than 0: no log_dir)."""
    monitor = getattr(getattr(engine, "monitor", None), "csv_monitor", None)
    log_dir = getattr(monitor, "log_dir", None)
    if monitor is None or not monitor.enabled or not log_dir or not os.path.isdir(log_dir):
        return None
    names = sorted(f for f in os.listdir(log_dir) if f.endswith(".csv"))
    if not names:
        return None
    if resumed_at_samples is None:
        k = 1
        while os.path.exists(f"{log_dir}.earlier-{k}"):
            k += 1
        aside = f"{log_dir}.earlier-{k}"
        os.makedirs(aside)
        for name in names:
            os.replace(os.path.join(log_dir, name), os.path.join(aside, name))
        return aside
    for name in names:
        path = os.path.join(log_dir, name)
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            continue                 # DeepSpeed writes its header into it
        kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resumed_at_samples]
        with open(path + ".tmp", "w", newline="") as f:
            csv.writer(f).writerows(rows[:1] + kept)
        os.replace(path + ".tmp", path)
        monitor.filenames.append(name[:-len(".csv")])    # DeepSpeed writes a header for names it has not seen
    return None
