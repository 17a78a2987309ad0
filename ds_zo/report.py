"""What a training job leaves behind for people: a PNG plot of training loss and evaluation accuracy, and a summary."""
from __future__ import annotations

import json
import os


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
