"""Deduplication, group-aware splitting and fingerprints."""

import hashlib
import random

import pytest

from peft_nlg.data.splits import canonical_jsonl, dedupe, fingerprint, split, subsample


def make(n, groups=None, dup_every=None):
    rows = []
    for i in range(n):
        src = f"source {i % dup_every if dup_every else i}"
        row = {"src": src, "trg": f"target {i}"}
        if groups:
            row["group"] = f"g{i % groups}"
        rows.append(row)
    return rows


def test_dedupe_keeps_the_first_of_each_src():
    rows = [{"src": s, "trg": t} for s, t in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")]]
    assert dedupe(rows) == [{"src": "a", "trg": "1"}, {"src": "b", "trg": "2"}, {"src": "c", "trg": "4"}]


def test_split_sizes_and_partition():
    rows = make(300)
    parts = split(rows, valid_size=20, test_size=30)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [250, 20, 30]
    assert sorted(map(str, parts["train"] + parts["valid"] + parts["test"])) == sorted(map(str, rows))


def test_split_is_deterministic_and_seeded():
    rows = make(200)
    assert split(rows, 10, 20) == split(list(rows), 10, 20)
    assert split(rows, 10, 20, seed=1)["test"] != split(rows, 10, 20, seed=0)["test"]
    shuffled = rows[:]
    random.Random(4).shuffle(shuffled)       # the assignment depends on content, not input order
    test_srcs = [{r["src"] for r in split(data, 10, 20)["test"]} for data in (shuffled, rows)]
    assert test_srcs[0] == test_srcs[1]


def test_groups_never_straddle_splits():
    rows = make(500, groups=37)
    parts = split(rows, valid_size=40, test_size=60)
    where = {}
    for name, part in parts.items():
        for row in part:
            assert where.setdefault(row["group"], name) == name, f"group {row['group']} in two splits"
    assert 0 < len(parts["test"]) <= 60 and 0 < len(parts["valid"]) <= 40
    assert sum(len(p) for p in parts.values()) == 500


def test_no_test_or_valid_src_in_train_even_with_duplicates():
    rows = make(400, dup_every=150)              # the same src under different trg, not deduplicated
    parts = split(rows, valid_size=30, test_size=30)
    train = {r["src"] for r in parts["train"]}
    test = {r["src"] for r in parts["test"]}
    assert not train & test
    assert not train & {r["src"] for r in parts["valid"]}
    assert not test & {r["src"] for r in parts["valid"]}
    assert parts["test"]


def test_group_duplicates_across_groups_are_removed_from_train():
    rows = [{"src": "same", "trg": f"t{i}", "group": f"g{i}"} for i in range(10)]
    rows += [{"src": f"other {i}", "trg": "x", "group": f"h{i}"} for i in range(50)]
    parts = split(rows, valid_size=5, test_size=5)
    held = {r["src"] for r in parts["valid"] + parts["test"]}
    assert not held & {r["src"] for r in parts["train"]}


def test_split_rejects_negative_sizes():
    with pytest.raises(ValueError):
        split(make(5), -1, 1)


def test_subsample_is_stable_and_ordered():
    rows = make(100)
    sub = subsample(rows, 10)
    assert len(sub) == 10 and sub == subsample(rows, 10)
    assert sub == [r for r in rows if r in sub]
    assert subsample(rows, 500) == rows


def test_fingerprint_is_sha256_of_the_canonical_jsonl():
    rows = [{"trg": "Hallo Welt", "src": "Hello world"}, {"src": "ä", "trg": "ö"}]
    text = canonical_jsonl(rows)
    assert text == '{"src": "Hello world", "trg": "Hallo Welt"}\n{"src": "ä", "trg": "ö"}\n'
    assert fingerprint(rows) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert fingerprint(rows) != fingerprint(rows[::-1])
    assert len(fingerprint([])) == 16


def test_groups_larger_than_the_eval_sizes_still_fill_each_split():
    rows = make(30, groups=3)                     # three groups of ten
    parts = split(rows, valid_size=2, test_size=2)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [10, 10, 10]
