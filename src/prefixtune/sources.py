"""Data sources through Hugging Face `datasets`: what ``--data`` / ``--validation`` name.

A ``save_to_disk`` folder, parquet / arrow / JSON / JSONL / CSV files or globs of them, or a hub id
(where the hub is reachable) become one memory-mapped `datasets.Dataset` (Arrow on disk, so a dataset
larger than RAM trains). What this adds to `datasets`: errors that name the file and line (text
formats) or row (binary ones) of a bad record. `datasets` reports a malformed JSONL or CSV file
without its line, so a file it cannot load is read once more line by line (`diagnose`) to name it.
"""

from __future__ import annotations

import bisect
import csv
import glob
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_FORMATS = (".jsonl", ".csv")  # their rows have line numbers


class DataError(ValueError):
    """A data file is missing, empty or malformed (the message names file, line and field)."""


@dataclass
class Source:
    """One dataset from one or more files, and where each of its rows came from."""

    dataset: datasets.Dataset
    files: list[str]  # in row order
    starts: list[int]  # the first row of each file

    def where(self, row: int) -> str:
        """``file:line`` (JSONL, CSV) or ``file row N`` (1-based) for a row of the whole dataset."""
        part = bisect.bisect_right(self.starts, row) - 1
        return location(self.files[part], row - self.starts[part])


def location(file: str, index: int) -> str:
    """Where the `index`-th (0-based) record of `file` is: its line for JSONL and CSV (found by reading
    the file up to it, only for error messages), its row number otherwise."""
    suffix = Path(file).suffix.lower()
    if suffix == ".jsonl":
        return next((where for i, (where, _) in enumerate(jsonl_records(Path(file))) if i == index), file)
    if suffix == ".csv":
        return next((where for i, (where, _) in enumerate(csv_records(Path(file))) if i == index), file)
    return f"{file} row {index + 1}"


def jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line as ``("file:line", object)``; anything but a JSON object is a `DataError` naming the line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each CSV row as ``("file:line", {column: value})``; malformed rows are a `DataError` naming the line."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)
        try:
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if None in record:
                    raise DataError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
                yield where, record
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({error})") from error


def diagnose(file: str, error: Exception) -> DataError:
    """Why `datasets` could not load `file`: the bad line of a JSONL or CSV file, an empty file, or
    the loader's own message."""
    path = Path(file)
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_FORMATS:
            for _ in jsonl_records(path) if suffix == ".jsonl" else csv_records(path):
                pass
        if not path.read_bytes().strip():
            return DataError(f"{file}: no examples (empty file?)")
    except DataError as found:
        return found
    except UnicodeDecodeError as decode:
        return DataError(f"{file}: not UTF-8 text ({decode})")
    return DataError(f"{file}: cannot be read as {BUILDERS[suffix]} ({type(error).__name__}: {error})")


def _load_file(file: str, split: str) -> datasets.Dataset:
    suffix = Path(file).suffix.lower()
    options = {"keep_default_na": False} if suffix == ".csv" else {}  # an empty cell stays "", not NaN
    try:
        return datasets.load_dataset(BUILDERS[suffix], data_files=[file], split=split, **options)
    except Exception as error:  # datasets raises many kinds; diagnose names the cause
        raise diagnose(file, error) from error


def _load_folder(folder: Path, split: str | None) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{folder}: no split {name!r} (has {sorted(loaded)}); choose one with --split")
        return loaded[name]
    if split:
        raise DataError(f"{folder}: a single saved dataset has no splits, got --split {split}")
    return loaded


def _files(spec: str) -> list[str]:
    """The files `spec` names: itself, or a glob's matches in sorted order."""
    files = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec] if Path(spec).is_file() else []
    for file in files:
        if Path(file).suffix.lower() not in BUILDERS:
            raise DataError(f"{file}: unsupported data format {Path(file).suffix!r}; expected one of {list(BUILDERS)}")
    return files


@contextmanager
def quiet() -> Iterator[None]:
    """Without `datasets`' tqdm bars (they would interleave with prefixtune's own output and errors)."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def load_source(spec: str | Path, split: str | None = None) -> Source:
    """The dataset `spec` names (see the module docstring); `split` picks a split of a folder or hub
    dataset, or slices files (``train[:100]``)."""
    with quiet():
        return _load_source(str(spec), split)


def _load_source(spec: str, split: str | None) -> Source:
    if Path(spec).is_dir():
        return Source(_load_folder(Path(spec), split), [spec], [0])
    files = _files(spec)
    if files:
        parts = [_load_file(file, split or "train") for file in files]
        starts = [sum(len(part) for part in parts[:i]) for i in range(len(parts))]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return Source(dataset, files, starts)
    if glob.has_magic(spec) or Path(spec).suffix.lower() in BUILDERS:
        raise DataError(f"{spec}: no such data file")
    try:  # a hub id
        return Source(datasets.load_dataset(spec, split=split or "train"), [spec], [0])
    except Exception as error:  # offline, unknown id, no such split: all name the spec
        raise DataError(f"{spec}: neither a local file or folder nor a loadable hub dataset ({error})") from error
