"""prepare_task: embedded, rebuilt, user files; validation, atomicity and overwrite protection."""

import dataclasses
import gzip
import json
import re
from pathlib import Path

import pytest

from peft_nlg.data import prepare
from peft_nlg.data.io import DataError, read_pairs
from peft_nlg.data.prepare import embedded_paths, load_embedded, prepare_task, write_embedded
from peft_nlg.data.splits import SPLITS, fingerprint
from peft_nlg.tasks import TASKS, get_task

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good_jsonl(path: Path, n: int, prefix: str = "") -> Path:
    return write_lines(path, [json.dumps({"src": f"{prefix}s{i}", "trg": f"{prefix}t{i}"}) for i in range(n)])


# --- the committed embedded data -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_committed_embedded_data(name):
    task = get_task(name)
    splits = load_embedded(task)
    valid_size, test_size = task.split_sizes
    assert len(splits["valid"]) == valid_size and len(splits["test"]) == test_size
    assert 1000 < len(splits["train"]) <= prepare.MAX_EMBEDDED_TRAIN
    train = {e["src"] for e in splits["train"]}
    assert not train & {e["src"] for e in splits["test"]}
    assert not train & {e["src"] for e in splits["valid"]}
    assert not {e["src"] for e in splits["valid"]} & {e["src"] for e in splits["test"]}
    for part in splits.values():
        assert len({e["src"] for e in part}) == len(part)
    note = (embedded_paths(task)["train"].parent / "PROVENANCE.md").read_text(encoding="utf-8")
    for split_name in SPLITS:
        row = re.search(rf"^\| {split_name} \| (\d+) \| `([0-9a-f]{{16}})` \|", note, re.M)
        assert row, f"PROVENANCE.md has no row for {split_name}"
        assert int(row.group(1)) == len(splits[split_name])
        assert row.group(2) == fingerprint(splits[split_name])


def test_committed_gz_files_are_reproducible(tmp_path):
    task = get_task("translation")
    splits = load_embedded(task)
    paths = write_embedded(task, splits, {}, embedded_dir=tmp_path)
    for name, path in paths.items():
        assert path.read_bytes() == embedded_paths(task)[name].read_bytes()


def test_prepare_embedded_writes_src_trg_only(tmp_path):
    summary = prepare_task("dialogue", data_dir=tmp_path)
    task = get_task("dialogue")
    assert summary["counts"]["test"] == task.split_sizes[1]
    assert summary["written"] == list(SPLITS)
    for name in SPLITS:
        path = tmp_path / "dialogue" / f"{name}.jsonl"
        assert summary["paths"][name] == str(path)
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        assert set(first) == {"src", "trg"}
        assert summary["fingerprints"][name] == fingerprint(read_pairs(path))
    assert summary["test_src_in_train"] == 0
    again = prepare_task("dialogue", data_dir=tmp_path)      # identical content: fine, nothing written
    assert again["written"] == [] and again["fingerprints"] == summary["fingerprints"]


def test_corrupt_embedded_gz_errors_cleanly_and_writes_nothing(tmp_path):
    emb = tmp_path / "emb"
    task = get_task("translation")
    write_embedded(task, {s: [{"src": f"{s} a", "trg": "b"}] for s in SPLITS}, {}, embedded_dir=emb)
    test_gz = embedded_paths(task, emb)["test"]
    test_gz.write_bytes(test_gz.read_bytes()[:-12])                  # truncated
    with pytest.raises(DataError) as err:
        prepare_task(task, data_dir=tmp_path / "data", embedded_dir=emb)
    assert str(test_gz) in str(err.value)
    assert files_under(tmp_path / "data") == []
    test_gz.write_bytes(gzip.compress(b'{"src": "x", "trg": ""}\n'))
    with pytest.raises(DataError) as err:
        prepare_task(task, data_dir=tmp_path / "data", embedded_dir=emb)
    assert err.value.line == 1 and err.value.field == "trg" and "empty" in str(err.value)
    assert files_under(tmp_path / "data") == []


# --- rebuilding from raw material ----------------------------------------------------------------------

def test_rebuild_from_fixture_raw_dir_is_deterministic(tmp_path):
    task = dataclasses.replace(get_task("translation"), split_sizes=(1, 2))
    summaries, blobs = [], []
    for attempt in range(2):
        emb = tmp_path / f"emb{attempt}"
        summaries.append(prepare_task(task, rebuild=True, raw_dir=FIXTURES / "ding",
                                      data_dir=tmp_path / f"data{attempt}", embedded_dir=emb))
        blobs.append({n: p.read_bytes() for n, p in embedded_paths(task, emb).items()})
    assert summaries[0]["fingerprints"] == summaries[1]["fingerprints"]
    assert blobs[0] == blobs[1]
    assert summaries[0]["counts"] == {"train": 3, "valid": 1, "test": 2}     # 6 unique sentence pairs
    emb_splits = load_embedded(task, tmp_path / "emb0")
    written = {n: read_pairs(tmp_path / "data0" / "translation" / f"{n}.jsonl") for n in SPLITS}
    assert emb_splits == written
    srcs = sorted(e["src"] for part in written.values() for e in part)
    assert "He headed in the rebound." in srcs and len(srcs) == len(set(srcs)) == 6
    note = (tmp_path / "emb0" / "translation" / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "trans-de-en" in note and fingerprint(written["test"]) in note


def test_rebuild_keeps_conversations_in_one_split(tmp_path):
    task = dataclasses.replace(get_task("dialogue"), split_sizes=(1, 1))
    prepare.rebuild_embedded(task, FIXTURES / "chitchat", embedded_dir=tmp_path)
    splits = load_embedded(task, tmp_path)
    assert all(splits[name] for name in SPLITS)
    for conversation in ({"Hi there!", "Hi there!\nHello. How are you?"},
                         {"What is your favorite food?", "Pizza\nNice\nAnd yours?"}):
        homes = [name for name, part in splits.items() if conversation & {e["src"] for e in part}]
        assert len(homes) == 1 and conversation <= {e["src"] for e in splits[homes[0]]}


# --- the user's files ----------------------------------------------------------------------------------

BAD_LINES = {
    "malformed": ('{"src": "a", "trg": "b"}', '{"src": "c", "trg": }', "malformed JSON", None),
    "missing field": ('{"src": "a", "trg": "b"}', '{"src": "c"}', "missing", "trg"),
    "empty field": ('{"src": "a", "trg": "b"}', '{"src": "  ", "trg": "d"}', "empty", "src"),
    "not a string": ('{"src": "a", "trg": "b"}', '{"src": "c", "trg": 5}', "expected a string", "trg"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_lines_name_file_line_and_field_and_write_nothing(tmp_path, case):
    first, bad, message, field = BAD_LINES[case]
    train = good_jsonl(tmp_path / "train.jsonl", 20)
    test = write_lines(tmp_path / "test.jsonl", [first, first.replace('"a"', '"z"'), bad])
    data = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare_task("translation", source="files", files={"train": train, "test": test}, data_dir=data)
    text = str(err.value)
    assert f"{test}:3" in text and message in text
    assert err.value.line == 3 and err.value.field == field
    if field:
        assert f"'{field}'" in text
    assert files_under(data) == []


def test_non_utf8_and_missing_file(tmp_path):
    train = good_jsonl(tmp_path / "train.jsonl", 20)
    bad = tmp_path / "test.jsonl"
    bad.write_bytes(b'{"src": "a", "trg": "b"}\n{"src": "Gr\xfc\xdfe", "trg": "x"}\n')
    data = tmp_path / "data"
    with pytest.raises(DataError) as err:
        prepare_task("translation", source="files", files={"train": train, "test": bad}, data_dir=data)
    assert f"{bad}:2" in str(err.value) and "UTF-8" in str(err.value)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        prepare_task("translation", source="files", files={"train": train, "test": missing}, data_dir=data)
    assert str(missing) in str(err.value) and "not found" in str(err.value)
    assert files_under(data) == []


def test_files_csv_custom_fields_and_carved_valid(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("id,english,german\n" + "".join(f'{i},"Hello, {i}",Hallo {i}\n' for i in range(40)),
                     encoding="utf-8")
    test = tmp_path / "test.csv"
    test.write_text("english,german\nGood night,Gute Nacht\nThanks,Danke\n", encoding="utf-8")
    summary = prepare_task("translation", source="files", files={"train": train, "test": test},
                           src_field="english", trg_field="german", data_dir=tmp_path / "data")
    assert summary["counts"] == {"train": 36, "valid": 4, "test": 2}
    out = {n: read_pairs(tmp_path / "data" / "translation" / f"{n}.jsonl") for n in SPLITS}
    assert out["test"] == [{"src": "Good night", "trg": "Gute Nacht"}, {"src": "Thanks", "trg": "Danke"}]
    together = sorted((e["src"], e["trg"]) for e in out["train"] + out["valid"])
    assert together == sorted((f"Hello, {i}", f"Hallo {i}") for i in range(40))
    assert not {e["src"] for e in out["train"]} & {e["src"] for e in out["valid"]}


def test_csv_missing_column_names_the_field(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("english,deutsch\nHi,Hallo\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare_task("translation", source="files", files={"train": train, "test": train},
                     src_field="english", trg_field="german", data_dir=tmp_path / "data")
    assert err.value.field == "german" and str(train) in str(err.value)
    assert files_under(tmp_path / "data") == []


def test_files_with_valid_and_argument_errors(tmp_path):
    files = {n: good_jsonl(tmp_path / f"{n}.jsonl", 3, prefix=n) for n in SPLITS}
    summary = prepare_task("summarization", source="files", files=files, data_dir=tmp_path / "data")
    assert summary["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert read_pairs(tmp_path / "data" / "summarization" / "valid.jsonl")[0] == {"src": "valids0",
                                                                                 "trg": "validt0"}
    with pytest.raises(ValueError, match="'test' file is required"):
        prepare_task("translation", source="files", files={"train": files["train"]}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        prepare_task("translation", source="web", data_dir=tmp_path)


# --- overwrite protection ------------------------------------------------------------------------------

def test_overwrite_protection(tmp_path):
    data = tmp_path / "data"
    first = {n: good_jsonl(tmp_path / f"a_{n}.jsonl", 5, prefix="a") for n in SPLITS}
    second = {n: good_jsonl(tmp_path / f"b_{n}.jsonl", 5, prefix="b") for n in SPLITS}
    prepare_task("translation", source="files", files=first, data_dir=data)
    before = {n: (data / "translation" / f"{n}.jsonl").read_bytes() for n in SPLITS}
    assert prepare_task("translation", source="files", files=first, data_dir=data)["written"] == []
    with pytest.raises(DataError, match="--overwrite") as err:
        prepare_task("translation", source="files", files=second, data_dir=data)
    assert "translation" in str(err.value)
    assert {n: (data / "translation" / f"{n}.jsonl").read_bytes() for n in SPLITS} == before
    summary = prepare_task("translation", source="files", files=second, data_dir=data, overwrite=True)
    assert summary["written"] == list(SPLITS)
    assert read_pairs(data / "translation" / "test.jsonl")[0] == {"src": "bs0", "trg": "bt0"}
    assert [p.name for p in (data / "translation").iterdir() if p.name.startswith(".")] == []


def test_jsonl_lines_survive_splitlines():
    from peft_nlg.data.io import jsonl_text
    rows = [{"prediction": "a\u2028b\x85c\u2029d\ne"}, {"prediction": "é"}]
    text = jsonl_text(rows)
    assert [json.loads(line) for line in text.splitlines()] == rows
