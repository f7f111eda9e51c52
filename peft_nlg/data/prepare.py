"""Turn a task's data source into ``data/<task>/{train,valid,test}.jsonl`` (``src``/``trg`` only).

Sources: the committed embedded splits (``peft_nlg/embedded/<task>/*.jsonl.gz``; ``rebuild=True`` regenerates
them from the raw packages), the original study's hub datasets, or the user's own JSONL/CSV files. All three
splits are read, validated and built in memory before anything is written, and existing files with other
content are only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import gzip
import inspect
import os
from pathlib import Path

from peft_nlg.data.io import DataError, atomic_write_bytes, atomic_write_text, read_pairs
from peft_nlg.data.splits import SPLITS, canonical_jsonl, dedupe, fingerprint, split, subsample
from peft_nlg.tasks import get_task
from peft_nlg.tasks.base import Task

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
MAX_EMBEDDED_TRAIN = 20_000        # keeps the committed data a few MB
SOURCES = ("embedded", "hub", "files")


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def embedded_paths(task: Task | str, embedded_dir: Path | None = None) -> dict[str, Path]:
    base = Path(embedded_dir) if embedded_dir is not None else EMBEDDED_DIR
    return {name: base / _task(task).name / f"{name}.jsonl.gz" for name in SPLITS}


def load_embedded(task: Task | str, embedded_dir: Path | None = None) -> dict[str, list[dict]]:
    """The committed splits, read and validated with :func:`read_pairs`."""
    return {name: read_pairs(path) for name, path in embedded_paths(task, embedded_dir).items()}


def build_embedded(task: Task | str, raw_dir: Path, max_train: int | None = MAX_EMBEDDED_TRAIN
                   ) -> tuple[dict[str, list[dict]], dict]:
    """fetch (skipped when the raw material is there) -> build -> dedupe -> split -> cap train, in memory.

    Returns the ``{"src", "trg"}`` splits and facts for the provenance note.
    """
    task = _task(task)
    raw_dir = Path(raw_dir)
    task.embedded.fetch(raw_dir)
    built = task.embedded.build(raw_dir)
    unique = dedupe(built)
    valid_size, test_size = task.split_sizes
    parts = split(unique, valid_size=valid_size, test_size=test_size)
    train_all = len(parts["train"])
    if max_train is not None:
        parts["train"] = subsample(parts["train"], max_train)
    splits = {name: [{"src": e["src"], "trg": e["trg"]} for e in parts[name]] for name in SPLITS}
    _validate(splits, f"embedded/{task.name}")
    module = inspect.getmodule(task.embedded.build)
    describe = getattr(module, "provenance", None)
    facts = {"built": len(built), "unique": len(unique), "train_before_cap": train_all,
             "max_train": max_train, "origin": describe(raw_dir) if describe else task.embedded.description}
    return splits, facts


def write_embedded(task: Task | str, splits: dict[str, list[dict]], facts: dict | None = None,
                   embedded_dir: Path | None = None) -> dict[str, Path]:
    """Write the splits as reproducible gzip files (mtime 0, no name) plus PROVENANCE.md."""
    task = _task(task)
    paths = embedded_paths(task, embedded_dir)
    for name, path in paths.items():
        data = gzip.compress(canonical_jsonl(splits[name]).encode("utf-8"), compresslevel=9, mtime=0)
        atomic_write_bytes(path, data)
    note = provenance_text(task, splits, paths, facts or {})
    atomic_write_text(paths["train"].parent / "PROVENANCE.md", note)
    return paths


def rebuild_embedded(task: Task | str, raw_dir: Path, max_train: int | None = MAX_EMBEDDED_TRAIN,
                     embedded_dir: Path | None = None) -> dict[str, list[dict]]:
    """Regenerate the committed embedded splits of ``task`` from its raw packages; returns the splits."""
    splits, facts = build_embedded(task, raw_dir, max_train)
    write_embedded(task, splits, facts, embedded_dir)
    return splits


def provenance_text(task: Task, splits: dict[str, list[dict]], paths: dict[str, Path], facts: dict) -> str:
    module = inspect.getmodule(task.embedded.build)
    module_name = module.__name__ if module else "?"
    lines = [
        f"# {task.name}: embedded data",
        "",
        f"- Source: {task.embedded.description}",
        f"- Raw material: {facts.get('origin', 'unknown')}",
        f"- License: {task.embedded.license}",
        f"- Built by: `{module_name}.build` -> `peft_nlg.data.splits.dedupe` (exact duplicate `src` "
        f"dropped) -> `split(valid_size={task.split_sizes[0]}, test_size={task.split_sizes[1]}, seed=0)` "
        f"(whole groups per split; no test/valid `src` in train) -> train capped at "
        f"{facts.get('max_train', MAX_EMBEDDED_TRAIN)} (`subsample`, seed 0)",
        f"- Regenerate: `peft_nlg.data.prepare.rebuild_embedded('{task.name}', raw_dir)` "
        f"(the CLI's `setup --rebuild`); the same package versions give byte-identical files",
    ]
    if facts:
        lines.append(f"- Examples built: {facts.get('built', '?')}; after dedupe: {facts.get('unique', '?')}"
                     f"; train before the cap: {facts.get('train_before_cap', '?')}")
    lines += ["", "| split | examples | fingerprint (sha256 of the decompressed JSONL, first 16 hex) | "
                  "gz bytes |", "|---|---|---|---|"]
    for name in SPLITS:
        size = paths[name].stat().st_size if paths[name].exists() else 0
        lines.append(f"| {name} | {len(splits[name])} | `{fingerprint(splits[name])}` | {size} |")
    doc = (module.__doc__ or "").strip() if module else ""
    if doc:
        lines += ["", "## How the examples are made", "", doc]
    return "\n".join(lines) + "\n"


def _validate(splits: dict[str, list[dict]], origin: str) -> dict[str, list[dict]]:
    for name in SPLITS:
        rows = splits.get(name)
        if not rows:
            raise DataError(origin, f"split '{name}' has no examples")
        for i, row in enumerate(rows, start=1):
            for field in ("src", "trg"):
                value = row.get(field) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{origin}/{name}", "missing or not a string", line=i, field=field)
                if not value.strip():
                    raise DataError(f"{origin}/{name}", "empty", line=i, field=field)
    return splits


def load_files(files: dict[str, str | os.PathLike], src_field: str = "src", trg_field: str = "trg",
               valid_size: int = 500) -> dict[str, list[dict]]:
    """The user's splits from JSONL/CSV files; without a ``valid`` file, valid is carved from train."""
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s) {', '.join(unknown)}; use train, valid and test")
    for name in ("train", "test"):
        if files.get(name) is None:
            raise ValueError(f"a '{name}' file is required (valid is optional)")
    splits = {name: read_pairs(path, src_field, trg_field)
              for name, path in files.items() if path is not None}
    if "valid" not in splits:
        train = splits["train"]
        size = min(valid_size, max(1, len(train) // 10))
        carved = split(train, valid_size=size, test_size=0)
        if not carved["train"]:
            raise DataError(files["train"], "too few examples to carve a validation split from")
        splits["train"], splits["valid"] = carved["train"], carved["valid"]
    return splits


def prepare_task(task: Task | str, source: str = "embedded", data_dir: str | os.PathLike = Path("data"),
                 rebuild: bool = False, raw_dir: str | os.PathLike | None = None, hub_path: str | None = None,
                 files: dict[str, str | os.PathLike] | None = None, src_field: str = "src",
                 trg_field: str = "trg", overwrite: bool = False, embedded_dir: Path | None = None) -> dict:
    """Write ``data_dir/<task>/{train,valid,test}.jsonl`` from ``source``; returns a summary.

    The summary holds ``task``, ``source``, ``dir``, and per split ``counts``, ``fingerprints`` (of the
    written content) and ``paths``, plus ``written`` (the splits whose file changed). ``embedded_dir``
    overrides where the embedded splits are read from and, with ``rebuild``, refreshed (tests).
    """
    task = _task(task)
    data_dir = Path(data_dir)
    facts = None
    if source == "embedded":
        if rebuild:
            raw = Path(raw_dir) if raw_dir is not None else data_dir / "raw" / task.name
            splits, facts = build_embedded(task, raw)
        else:
            splits = load_embedded(task, embedded_dir)
    elif source == "hub":
        splits = task.hub.load(hub_path)
    elif source == "files":
        if not files:
            raise ValueError("source 'files' needs files={'train': ..., 'test': ..., ['valid': ...]}")
        splits = load_files(files, src_field, trg_field, valid_size=task.split_sizes[0])
    else:
        raise ValueError(f"unknown source '{source}'; choose from {', '.join(SOURCES)}")
    rows = {name: [{"src": e["src"], "trg": e["trg"]} for e in splits.get(name) or []] for name in SPLITS}
    _validate(rows, f"{source}/{task.name}")

    out_dir = data_dir / task.name
    paths = {name: out_dir / f"{name}.jsonl" for name in SPLITS}
    texts = {name: canonical_jsonl(rows[name]) for name in SPLITS}
    changed = []
    for name, path in paths.items():
        if path.exists():
            if path.read_bytes() == texts[name].encode("utf-8"):
                continue
            if not overwrite:
                raise DataError(path, "exists with different content; pass --overwrite to replace it")
        changed.append(name)
    if facts is not None:
        write_embedded(task, rows, facts, embedded_dir)
    for name in changed:
        atomic_write_text(paths[name], texts[name])

    train_src = {e["src"] for e in rows["train"]}
    return {
        "task": task.name,
        "source": source,
        "dir": str(out_dir),
        "counts": {name: len(rows[name]) for name in SPLITS},
        "fingerprints": {name: fingerprint(rows[name]) for name in SPLITS},
        "paths": {name: str(paths[name]) for name in SPLITS},
        "written": changed,
        "test_src_in_train": sum(e["src"] in train_src for e in rows["test"]),
    }
