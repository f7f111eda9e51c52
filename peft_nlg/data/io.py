"""Reading and writing example files: strict validation on the way in, atomic writes on the way out."""

from __future__ import annotations

import csv
import gzip
import json
import os
import stat
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path


class DataError(Exception):
    """Bad input data; the message is one line naming the file, line and field."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _decode(path: Path, raw: bytes, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte {err.start})", line=line_no) from None


def _checked_pair(path: Path, line_no: int, record: object, src_field: str, trg_field: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(path, "expected a JSON object", line=line_no)
    pair = {}
    for field, name in ((src_field, "src"), (trg_field, "trg")):
        if field not in record:
            raise DataError(path, "missing", line=line_no, field=field)
        value = record[field]
        if not isinstance(value, str):
            raise DataError(path, f"expected a string, got {type(value).__name__}", line=line_no, field=field)
        if not value.strip():
            raise DataError(path, "empty", line=line_no, field=field)
        pair[name] = value
    return pair


def read_pairs(path: str | os.PathLike, src_field: str = "src", trg_field: str = "trg") -> list[dict]:
    """Read a JSONL (optionally .gz) or CSV file of source/target pairs, validating every line.

    Returns dicts with keys ``src`` and ``trg`` whatever the fields were called in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.suffix.lower() == ".csv":
        return _read_csv_pairs(path, src_field, trg_field)
    pairs = []
    line_no = 0
    try:
        with _open_text(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                text = _decode(path, raw, line_no)
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(path, f"malformed JSON ({err.msg}, column {err.colno})",
                                    line=line_no) from None
                pairs.append(_checked_pair(path, line_no, record, src_field, trg_field))
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or a truncated or corrupt .gz
        raise DataError(path, f"cannot read file ({err})", line=line_no + 1) from None
    if not pairs:
        raise DataError(path, "no examples in file")
    return pairs


def _read_csv_pairs(path: Path, src_field: str, trg_field: str) -> list[dict]:
    raw = path.read_bytes()
    text = _decode(path, raw, 1 + raw[: _bad_utf8_offset(raw)].count(b"\n"))
    reader = csv.DictReader(text.splitlines())
    for field in (src_field, trg_field):
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise DataError(path, "missing from the CSV header", line=1, field=field)
    pairs = [_checked_pair(path, reader.line_num, row, src_field, trg_field) for row in reader]
    if not pairs:
        raise DataError(path, "no examples in file")
    return pairs


def _bad_utf8_offset(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
        return len(raw)
    except UnicodeDecodeError as err:
        return err.start


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Bytes counterpart of :func:`atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the replaced file's mode, or the usual 0644
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# characters that str.splitlines() and some editors take for line ends; JSON allows them raw, we escape them
_LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_text(rows: Iterable[dict]) -> str:
    """One JSON object per line, and nothing else that any reader could take for a line end."""
    return "".join(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_IN_JSON) + "\n" for row in rows)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        yield from (line.rstrip("\n") for line in handle)
