"""Reading JSON Lines or a JSON array of objects, with errors that name the file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils.errors import UserError


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a JSON or JSON Lines file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(
            f"{path} line {line}: not UTF-8 (byte 0x{raw[error.start]:02x}); re-encode the file, "
            f"e.g. `iconv -f GBK -t UTF-8 {path} > fixed.json`"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def read_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSON array or of a JSON Lines file, each with a location like `line 3` or `row 3`.

    The format is told by the first character: `[` is a JSON array, anything else JSON Lines. Blank lines in
    JSON Lines are skipped. Every row must be a JSON object.
    """
    path = Path(path)
    text = _read_text(path)
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {error.lineno}: invalid JSON ({error.msg})") from None
        located = [(f"row {index}", row) for index, row in enumerate(rows, start=1)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise UserError(f"{path} line {number}: invalid JSON ({error.msg})") from None
    if not located:
        raise UserError(f"{path}: holds no rows")
    for where, row in located:
        if not isinstance(row, dict):
            raise UserError(f"{path} {where}: expected a JSON object, got {type(row).__name__}")
    return located


def check_string_fields(
    path: str | Path,
    located_rows: Iterable[tuple[str, dict[str, Any]]],
    required: Iterable[str],
    optional: Iterable[str] = (),
) -> None:
    """Fail on the first row where a required field is missing or a field is not a string (None counts as absent)."""
    required, optional = tuple(required), tuple(optional)
    for where, row in located_rows:
        for field in required:
            if field not in row or row[field] is None:
                raise UserError(f"{path} {where}: missing field `{field}`")
        for field in required + optional:
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                raise UserError(
                    f"{path} {where}: field `{field}` must be a string, got {type(value).__name__}"
                )


def string_values(path: str | Path, field: str) -> set[str]:
    """Every string `field` of the JSON object lines of an append-only JSON Lines file (none when it is absent).

    A line torn by a crash mid-write is skipped, not an error: the file's writer redoes that item.
    """
    path = Path(path)
    if not path.exists():
        return set()
    values: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get(field), str):
            values.add(row[field])
    return values
