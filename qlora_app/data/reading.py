"""Raw records from a local file (.jsonl, .json, .csv, .parquet) or a Hub dataset, each with where it came from.

Every record is a (location, dict) pair; the location is 'file:line' (or 'file record N', 'file row N', or the
Hub split and index) so that every later error can name it. Nothing here knows what the columns mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_app.errors import UserError
from qlora_app.hub import access

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_local(source: str) -> bool:
    return source.startswith(("/", ".")) or Path(source).suffix in LOCAL_SUFFIXES


def read_source(source: str, split: str) -> tuple[list[tuple[str, dict]], str]:
    """Raw records as (location, record) pairs; location is 'file:line' or 'split[index]' for errors."""
    if is_local(source):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"data file {source} does not exist")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"data file {source}: unsupported type '{path.suffix}'; use {', '.join(LOCAL_SUFFIXES)}")
        readers: dict[str, Callable[[Path], list[tuple[str, dict]]]] = {
            ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_table, ".parquet": _read_table}
        rows = readers[path.suffix](path)
        origin = str(path)
    else:
        rows = _read_hub(source, split)
        origin = f"{source} [{split}]"
    if not rows:
        raise UserError(f"{origin}: the dataset is empty")
    return rows, origin


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            rows.append((f"{path}:{number}", record))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [(f"{path} record {i + 1}", r) for i, r in enumerate(data)]


def _read_table(path: Path) -> list[tuple[str, dict]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas and pyarrow raise many types for a broken file
        raise UserError(f"{path}: cannot read {path.suffix[1:]} ({str(exc).splitlines()[0]})") from None
    offset = 2 if path.suffix == ".csv" else 1  # csv: line 1 is the header
    return [(f"{path}:{i + offset}" if path.suffix == ".csv" else f"{path} row {i + 1}", _plain(r))
            for i, r in enumerate(frame.to_dict(orient="records"))]


def _plain(value: Any) -> Any:
    """Parquet's list columns (messages, chosen/rejected conversations) come back as numpy arrays: as lists."""
    import numpy

    if isinstance(value, numpy.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read_hub(dataset_id: str, split: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        with access.hub_errors(dataset_id, kind="dataset"):
            ds = datasets.load_dataset(dataset_id, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"dataset {dataset_id} has no split '{split}': {str(exc).splitlines()[0]}") from None
        raise
    except (FileNotFoundError, ConnectionError) as exc:
        access.check_readable(dataset_id, kind="dataset")  # datasets drops the Hub's answer: ask for it again
        raise UserError(f"cannot load dataset {dataset_id}: {str(exc).splitlines()[0]}") from None
    return [(f"{dataset_id} [{split}] record {i}", r) for i, r in enumerate(ds)]
