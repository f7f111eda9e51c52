"""Deduplication, group-aware deterministic splitting, and content fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

SPLITS = ("train", "valid", "test")


def dedupe(examples: Iterable[dict]) -> list[dict]:
    """Drop examples whose ``src`` was seen before, keeping the first in input order (builders are sorted)."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        if example["src"] not in seen:
            seen.add(example["src"])
            kept.append(example)
    return kept


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def group_key(example: dict) -> str:
    group = example.get("group")
    return f"g:{group}" if group not in (None, "") else f"s:{example['src']}"


def split(examples: Iterable[dict], valid_size: int, test_size: int, seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic train/valid/test split that keeps each group (or each ``src``, without a group) whole.

    Groups are visited in the order of a seeded hash of their key; a group goes to test if it fits in
    ``test_size`` (or test is still empty), else to valid if it fits in ``valid_size`` (or valid is still
    empty), else to train, so sizes are exact where groups allow. Finally every example whose
    ``src`` also occurs in test leaves train and valid, and every one whose ``src`` occurs in valid leaves
    train, so no evaluation source is ever trained on.
    """
    if valid_size < 0 or test_size < 0:
        raise ValueError("split sizes must be >= 0")
    groups: dict[str, list[dict]] = {}
    for example in examples:
        groups.setdefault(group_key(example), []).append(example)
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for key in sorted(groups, key=lambda k: _rank(k, seed)):
        members = groups[key]
        if len(out["test"]) + len(members) <= test_size or (test_size and not out["test"]):
            out["test"].extend(members)
        elif len(out["valid"]) + len(members) <= valid_size or (valid_size and not out["valid"]):
            out["valid"].extend(members)
        else:
            out["train"].extend(members)
    test_src = {e["src"] for e in out["test"]}
    out["valid"] = [e for e in out["valid"] if e["src"] not in test_src]
    held_out = test_src | {e["src"] for e in out["valid"]}
    out["train"] = [e for e in out["train"] if e["src"] not in held_out]
    return out


def subsample(examples: list[dict], size: int, seed: int = 0) -> list[dict]:
    """``size`` examples chosen by a seeded hash of their ``src``, in their original order."""
    if len(examples) <= size:
        return list(examples)
    chosen = sorted(range(len(examples)), key=lambda i: _rank(examples[i]["src"], seed))[:size]
    return [examples[i] for i in sorted(chosen)]


def canonical_jsonl(rows: Iterable[dict]) -> str:
    """The JSONL text of the data files: ``json.dumps(row, ensure_ascii=False, sort_keys=True)`` a line."""
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def fingerprint(rows: Iterable[dict]) -> str:
    """Short sha256 hex of :func:`canonical_jsonl` (of ``{"src", "trg"}`` rows: the written file's bytes)."""
    return hashlib.sha256(canonical_jsonl(rows).encode("utf-8")).hexdigest()[:16]
