"""Reading the user's own data files (CSV or JSONL) into plain dicts, with errors that point at the bad row.

Every error names the file, the row and the problem, because a typo on row 7,412 of someone's CSV is otherwise a
needle in a haystack. CSV rows are numbered as data rows (the header is not counted) together with their line in the
file (a quoted field may span lines); JSONL rows are numbered by line, the objects of a JSON array as items.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """A data file that cannot be used as given; the message names the file, the row and the problem."""


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yields (where, row) for each record of a .csv/.tsv, .jsonl or .json file (JSON Lines, or one JSON array of
    objects); `where` is "file, row N (line L)", "file, line N" or "file, item N"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows = _json_rows(path, array_allowed=suffix == ".json")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl (one JSON object a line) "
                        "or .json")
    yield from rows


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    # csv's field limit (131,072 characters) is process-wide: raised while this file is read, then restored
    previous = csv.field_size_limit(2**31 - 1)
    try:
        yield from _csv_records(path, delimiter)
    finally:
        csv.field_size_limit(previous)


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    # quoted as spreadsheets, csv.writer and pandas write them (a quoted field may hold delimiters, doubled quotes
    # and newlines), strictly: a quote left open is an error where it opens, not the rows after it taken into one
    # field unsaid; a quote inside an unquoted field is text
    with open(path, encoding="utf-8-sig", newline="") as f:   # -sig: spreadsheet exports often start with a BOM
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        start, number = 1, 0
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header row)")
            if not header:
                raise DataError(f"{path}: line 1 is blank; the first line must be the header row (the column names)")
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(f"{path}: the header names column(s) {repeated} more than once")
            start = reader.line_num + 1
            for fields in reader:
                if not fields:                      # a blank line: no row (its line still counts)
                    start = reader.line_num + 1
                    continue
                number += 1
                where = f"{path}, row {number} (line {start})"
                if len(fields) > len(header):
                    raise DataError(f"{where}: {len(fields)} fields but the header has {len(header)}")
                row = dict(zip(header, fields + [None] * (len(header) - len(fields))))
                if len(fields) < len(header) and any(delimiter in v.partition("\n")[2] for v in fields):
                    # a quoted field that closes lines later, taking the lines in between
                    raise DataError(f"{where}: spans lines {start}-{reader.line_num} and has fewer fields than the "
                                    "header: a field that starts with a double quote (\") and does not close it "
                                    "takes the following lines; quote the whole field and double its inner quotes")
                yield where, row
                start = reader.line_num + 1
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except csv.Error as error:
            where = f"row {number + 1} (line {start})" if start > 1 else "the header (line 1)"
            raise DataError(f"{path}, {where}: {error}: a field that starts with a double quote (\") is quoted: it "
                            "ends at the next lone quote, which a delimiter or the line's end must follow, and quotes "
                            "inside it are doubled (\"\"); a quote inside an unquoted field is text (a file whose "
                            "fields start with quotes that are text, such as GLUE's TSV files, must double them "
                            "and quote the field, or be converted to JSON Lines)") from None


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, at its first bad byte (a decoding reader only knows its block)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = 1 + data[:error.start].count(b"\n")
        return DataError(f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}: {error.reason}); "
                         "save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _json_rows(path: Path, array_allowed: bool) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if array_allowed and text.lstrip().startswith("["):   # a .json export: one array of objects, not JSON Lines
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
        rows = ((f"{path}, item {number}", row) for number, row in enumerate(items, start=1))
    else:
        rows = _json_lines(path, text)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, object]]:
    # lines end at "\n" only: str.splitlines() also splits at U+2028, U+2029 and U+0085, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            hint = ("; JSON Lines hold one whole object per line, and this looks like JSON spread over lines: write "
                    "each object on one line, or save one array of objects as .json" if line.strip() in ("{", "[")
                    else "")
            raise DataError(f"{where}: invalid JSON ({error.msg}){hint}") from None


def field(where: str, row: dict, column: str, allow_empty: bool = False) -> str:
    """The row's value for `column` as a string; a DataError if the column is missing (or the value empty)."""
    if column not in row:
        raise DataError(f"{where}: missing column {column!r} (has {sorted(k for k in row if k is not None)})")
    if row[column] is None:   # a short CSV row, or JSON null
        raise DataError(f"{where}: no value for column {column!r}")
    value = row[column]
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: column {column!r} holds a JSON {type(value).__name__}; expected a string or a "
                        "number")
    value = value if isinstance(value, str) else json.dumps(value)
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: empty {column!r}")
    return value


def read_labelled(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                  label_values: Sequence[str] = ("0", "1")) -> list[dict]:
    """[{"text", "label"}] from a CSV/JSONL file; `label` is the index of the row's value in `label_values`.

    Values compare as stripped strings, so a CSV's "1" and a JSONL's 1 both match "1"; pass e.g.
    ("negative", "positive") for named labels.
    """
    allowed = [str(v).strip() for v in label_values]
    examples = []
    for where, row in iter_rows(path):
        text = field(where, row, text_column)
        value = field(where, row, label_column).strip()
        if value not in allowed:
            raise DataError(f"{where}: label {value!r} is not one of {allowed}")
        examples.append({"text": text, "label": allowed.index(value)})
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def read_prompt_completion(path: str | os.PathLike, prompt_column: str = "prompt",
                           completion_column: str = "completion") -> list[dict]:
    """[{"prompt", "completion", "where"}] from a JSONL (or CSV) file; the prompt may be empty, the completion may
    not. `where` names the row for later errors (a prompt too long for max_length)."""
    examples = [{"prompt": field(where, row, prompt_column, allow_empty=True),
                 "completion": field(where, row, completion_column), "where": where} for where, row in iter_rows(path)]
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples
