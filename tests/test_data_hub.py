"""The hub loaders on tiny local datasets in each hub repository's layout (through ``datasets``, unmocked)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # before datasets is imported anywhere
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from peft_nlg.data import prepare  # noqa: E402
from peft_nlg.data.io import DataError, read_pairs  # noqa: E402
from peft_nlg.data.sources import hub  # noqa: E402

HUB_SPLITS = ("train", "validation", "test")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def readme(config: str) -> str:
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in HUB_SPLITS)
    return f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# local copy\n"


def write_parquet(path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


# --- WMT14 ---------------------------------------------------------------------------------------------

def wmt_rows(split):
    good = [{"de": f"Das ist Satz {i} aus {split}.", "en": f"This is sentence {i} from {split}."}
            for i in range(4)]
    bad = [{"de": "", "en": "Empty German side."},
           {"de": "Wort " * 120, "en": "Word " * 120},                       # too long
           {"de": "Kurz.", "en": "This English side is far far far far far far too long for it."}]
    return good[:2] + bad + good[2:]


def make_wmt(root, with_readme=True):
    for split in HUB_SPLITS:
        write_parquet(root / "de-en" / f"{split}-00000-of-00001.parquet", {"translation": wmt_rows(split)})
    if with_readme:
        (root / "README.md").write_text(readme("de-en"), encoding="utf-8")
    return root


@pytest.mark.parametrize("with_readme", [True, False])
def test_wmt14_local_copy(tmp_path, with_readme):
    root = make_wmt(tmp_path / "wmt14", with_readme)
    data = hub.load_wmt14_de_en(str(root), cache_dir=str(tmp_path / "cache"))
    assert set(data) == {"train", "valid", "test"}
    assert data["valid"] == [{"src": f"This is sentence {i} from validation.",
                              "trg": f"Das ist Satz {i} aus validation."} for i in range(4)]
    assert data["test"][0] == {"src": "This is sentence 0 from test.", "trg": "Das ist Satz 0 aus test."}
    assert sorted(e["src"] for e in data["train"]) == [f"This is sentence {i} from train." for i in range(4)]


def test_wmt14_caps_are_deterministic(tmp_path):
    root = make_wmt(tmp_path / "wmt14")
    a = hub.load_wmt14_de_en(str(root), train_cap=2, valid_cap=1, test_cap=3, cache_dir=str(tmp_path / "c"))
    b = hub.load_wmt14_de_en(str(root), train_cap=2, valid_cap=1, test_cap=3, cache_dir=str(tmp_path / "c"))
    assert a == b
    assert [len(a[s]) for s in ("train", "valid", "test")] == [2, 1, 3]
    assert a["test"] == [{"src": f"This is sentence {i} from test.", "trg": f"Das ist Satz {i} aus test."}
                         for i in range(3)]


# --- DailyDialog ---------------------------------------------------------------------------------------

DIALOGS = [
    ["Say , Jim , how about going for a few beers after dinner ? ", " You know that is tempting . ",
     "What do you mean ?"],
    ["Can you do push-ups ? ", " Of course I can . ", " " + "really " * 70, "Wow ."],
]


def make_daily_dialog(root):
    """The hub's parquet export layout: default/<split>/0000.parquet with dialog, act and emotion."""
    for split in HUB_SPLITS:
        write_parquet(root / "default" / split / "0000.parquet",
                      {"dialog": DIALOGS, "act": [[1] * len(d) for d in DIALOGS],
                       "emotion": [[0] * len(d) for d in DIALOGS]})
    return root


def test_daily_dialog_consecutive_turn_pairs(tmp_path):
    data = hub.load_daily_dialog(str(make_daily_dialog(tmp_path / "dd")), cache_dir=str(tmp_path / "c"))
    expected = [("Say , Jim , how about going for a few beers after dinner ?", "You know that is tempting ."),
                ("You know that is tempting .", "What do you mean ?"),
                ("Can you do push-ups ?", "Of course I can .")]
    assert [(e["src"], e["trg"]) for e in data["test"]] == expected
    groups = [e["group"] for e in data["test"]]
    assert groups[0] == groups[1] != groups[2]
    assert sorted(e["src"] for e in data["train"]) == sorted(s for s, _ in expected)


def test_daily_dialog_json_files(tmp_path):
    root = tmp_path / "dd-json"
    root.mkdir()
    for split in HUB_SPLITS:
        (root / f"{split}.json").write_text(
            "".join(json.dumps({"dialog": d, "act": [1] * len(d), "emotion": [0] * len(d)}) + "\n"
                    for d in DIALOGS), encoding="utf-8")
    data = hub.load_daily_dialog(str(root), train_cap=2, cache_dir=str(tmp_path / "c"))
    assert len(data["train"]) == 2 and len(data["valid"]) == 3


# --- CNN/DailyMail -------------------------------------------------------------------------------------

def make_cnn(root):
    long_article = " ".join(f"w{i}" for i in range(500))
    for split in HUB_SPLITS:
        write_parquet(root / "3.0.0" / f"{split}-00000-of-00001.parquet", {
            "article": [long_article, "Too short to keep.", "(CNN) -- " + "Some news words here . " * 10],
            "highlights": ["First point .\nSecond point .", "short", "The news ."],
            "id": ["a1", "a2", "a3"],
        })
    (root / "README.md").write_text(readme("3.0.0"), encoding="utf-8")
    return root


def test_cnn_dailymail_truncates_and_filters(tmp_path):
    data = hub.load_cnn_dailymail(str(make_cnn(tmp_path / "cnn")), cache_dir=str(tmp_path / "c"))
    test = data["test"]
    assert len(test) == 2
    assert test[0]["src"].split() == [f"w{i}" for i in range(hub.MAX_ARTICLE_WORDS)]
    assert test[0]["trg"] == "First point . Second point ."
    assert test[1]["src"].startswith("(CNN) -- Some news") and test[1]["trg"] == "The news ."


# --- errors and the prepare path -----------------------------------------------------------------------

def test_hub_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        hub.load_wmt14_de_en(str(tmp_path / "absent"))
    root = tmp_path / "partial"
    write_parquet(root / "de-en" / "train-00000-of-00001.parquet", {"translation": wmt_rows("train")})
    with pytest.raises(DataError, match="missing split"):
        hub.load_wmt14_de_en(str(root), cache_dir=str(tmp_path / "c"))
    wrong = tmp_path / "wrong"
    for split in HUB_SPLITS:
        write_parquet(wrong / "3.0.0" / f"{split}-00000-of-00001.parquet", {"story": ["x"], "id": ["1"]})
    with pytest.raises(DataError) as err:
        hub.load_cnn_dailymail(str(wrong), cache_dir=str(tmp_path / "c"))
    assert err.value.field == "article"


def test_prepare_task_from_a_local_hub_copy(tmp_path):
    root = make_wmt(tmp_path / "wmt14")
    summary = prepare.prepare_task("translation", source="hub", hub_path=str(root),
                                   data_dir=tmp_path / "data")
    assert summary["counts"] == {"train": 4, "valid": 4, "test": 4}
    assert read_pairs(tmp_path / "data" / "translation" / "valid.jsonl")[1] == {
        "src": "This is sentence 1 from validation.", "trg": "Das ist Satz 1 aus validation."}
