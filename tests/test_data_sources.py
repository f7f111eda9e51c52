"""The embedded-data builders on small fixtures in each source's real format."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from peft_nlg.data.io import DataError
from peft_nlg.data.sources import apt_descriptions, chitchat, ding
from peft_nlg.data.splits import dedupe, fingerprint

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def pairs(examples):
    return [(e["src"], e["trg"]) for e in examples]


# --- Ding ----------------------------------------------------------------------------------------------

DING_EXPECTED = [
    ("I’ve made one or two modifications to the original design.",
     "Ich habe am ursprünglichen Entwurf ein paar Änderungen vorgenommen."),
    ("I usually cut across the park on my way home.",
     "Auf dem Heimweg nehme ich immer die Abkürzung über den Park."),
    ("You can cut across here.", "Hier geht der kurze Weg."),
    ("A relief nurse came to give me a break.",
     "Eine Krankenschwester löste mich ab, damit ich Pause machen konnte."),
    ("He headed in the rebound.", "Er köpfte den Abpraller ein."),
    ("The draft was drawn up in consultation with all the departments involved.",
     "Der Entwurf wurde in Absprache mit allen beteiligten Abteilungen erstellt."),
    ("He headed in the rebound.", "Er köpfte den Abpraller ein."),
]


def test_ding_build_keeps_only_clean_sentence_pairs():
    examples = ding.build(FIXTURES / "ding")
    assert pairs(examples) == DING_EXPECTED
    assert all(e["group"] == e["trg"] for e in examples)
    assert len(dedupe(examples)) == len(DING_EXPECTED) - 1


@pytest.mark.parametrize("line", [
    "Noch ist nicht aller Tage Abend.; Man soll nicht loben. :: It’s not over.; It ain’t.",
    "Das ist ohnehin klar. Das liegt ohnehin auf der Hand. :: You are stating the obvious.",
    "Ich muss warten, bis meine Ablösung kommt. :: I have to wait until my relief comes/arrives.",
    "Er hat etw. gesagt. :: He said sth. to me.",
    "Es geht {vi} los. :: It starts now.",
    "Das ist gut. [ugs.] :: That is good.",
    "Das war’s … :: That was it …",
    "Nur ein Teil :: only one part | extra part",
    "ich gehe nach Hause. :: i go home.",
    "Gut. :: Good.",
    "# Version :: devel",
])
def test_ding_rejects_fragments_alternatives_and_annotations(line):
    assert ding.parse_line(line) == []


def test_ding_accepts_a_bare_dictionary_copy(tmp_path):
    shutil.copy(FIXTURES / "ding" / ding.DICT_PATH, tmp_path / "de-en")
    assert pairs(ding.build(tmp_path)) == DING_EXPECTED


def test_ding_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="Ding dictionary not found"):
        ding.build(tmp_path)
    (tmp_path / "de-en").write_bytes("Er köpfte. :: He headed.\n".encode() + b"Gr\xfc\xdfe :: greetings\n")
    with pytest.raises(DataError) as err:
        ding.build(tmp_path)
    assert err.value.line == 2 and "de-en:2" in str(err.value) and "UTF-8" in str(err.value)


def test_ding_fetch_is_skipped_when_the_dictionary_is_there(monkeypatch):
    monkeypatch.setattr(ding, "run", lambda *a, **k: pytest.fail("fetch must not download again"))
    ding.fetch(FIXTURES / "ding")


# --- Chit-Chat -----------------------------------------------------------------------------------------

CHITCHAT_ALL = [
    ("Hi there!", "Hello. How are you?", "b-conv"),
    ("Hi there!\nHello. How are you?", "Great, thanks. You?", "b-conv"),
    ("What is your favorite food?", "Pizza", "c-conv"),
    ("What is your favorite food?\nPizza", "Nice", "c-conv"),
    ("What is your favorite food?\nPizza\nNice", "And yours?", "c-conv"),
    ("Pizza\nNice\nAnd yours?", "Sushi", "c-conv"),
    ("Good morning", "Morning!", "d-conv"),
]


def test_chitchat_build_context_turns_and_groups():
    examples = chitchat.build(FIXTURES / "chitchat", per_conversation=None)
    assert [(e["src"], e["trg"], e["group"]) for e in examples] == CHITCHAT_ALL


def test_chitchat_context_size_and_per_conversation_cap():
    one = chitchat.build(FIXTURES / "chitchat", context_turns=1, per_conversation=None)
    assert [e["src"] for e in one] == ["Hi there!", "Hello. How are you?", "What is your favorite food?",
                                       "Pizza", "Nice", "And yours?", "Good morning"]
    capped = chitchat.build(FIXTURES / "chitchat", per_conversation=2)
    assert len(capped) == 5
    chosen = [(e["src"], e["trg"], e["group"]) for e in capped]
    assert [c for c in chosen if c[2] == "b-conv"] == CHITCHAT_ALL[:2]
    c_conv = [c for c in chosen if c[2] == "c-conv"]
    assert len(c_conv) == 2 and all(c in CHITCHAT_ALL for c in c_conv)
    assert c_conv == sorted(c_conv, key=CHITCHAT_ALL.index)      # turn order kept
    assert capped == chitchat.build(FIXTURES / "chitchat", per_conversation=2)


def test_chitchat_long_turns_are_neither_target_nor_context():
    turns = ["Hi", " ".join(["w"] * 61), "short reply", "ok"]
    examples = chitchat.conversation_examples("x", turns)
    assert [(e["src"], e["trg"]) for e in examples] == [("short reply", "ok")]


def test_chitchat_bad_data(tmp_path):
    (tmp_path / "dataset.json").write_text('{"a": {"messages": [[{"text": "hi"}]]', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as err:
        chitchat.build(tmp_path)
    assert err.value.line == 1
    (tmp_path / "dataset.json").write_text(json.dumps({"a": {"messages": [[{"sender": "x"}]]}}))
    with pytest.raises(DataError) as err:
        chitchat.build(tmp_path)
    assert err.value.field == "text" and "conversation a" in str(err.value)
    (tmp_path / "dataset.json").write_text(json.dumps({"a": {"turns": []}}))
    with pytest.raises(DataError) as err:
        chitchat.build(tmp_path)
    assert err.value.field == "messages"


# --- Debian descriptions -------------------------------------------------------------------------------

APT_EXPECTED = [
    ("The ‘Open Free Fiasco Firmware Flasher’ aka 0xFFFF utility implements a free userspace handler for the "
     "NOLO bootloader and extended features for flashing, dumping and getting information for the Nokia "
     "Internet Tablets. Thus it's a free alternative to Nokia's closed source flashing utility called "
     "flasher. Supported operations currently include, but are not limited to: generating and unpacking "
     "FIASCO images on local device; editing Maemo firmware packages; flashing any kind image type to Maemo "
     "devices via USB; \"cold\" flashing for devices with bricked bootloaders. Supported are the Nokia 770, "
     "N800, N810, N810w, N900, N950 and N9.", "Open Free Fiasco Firmware Flasher"),
    ("2ping is a bi-directional ping utility. It uses 3-way pings (akin to TCP SYN, SYN/ACK, ACK) and "
     "after-the-fact state comparison between a 2ping listener and a 2ping client to determine which "
     "direction packet loss occurs.", "Ping utility to determine directional packet loss"),
    ("Foo is a library for frobnicating widgets quickly and with very little memory overhead. This package "
     "contains the shared library.", "frobnication library"),
    ("zzz-tool counts down in the terminal and then runs a command of your choice, for example to suspend "
     "the machine after a film has ended.", "sleep timer for the terminal"),
]


def test_apt_build_paragraphs_bullets_families_and_filters():
    assert pairs(apt_descriptions.build(FIXTURES / "apt")) == APT_EXPECTED


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 command")
def test_apt_build_reads_lz4_indexes(tmp_path):
    for path in sorted((FIXTURES / "apt").iterdir()):
        subprocess.run(["lz4", "-q", str(path), str(tmp_path / (path.name + ".lz4"))], check=True)
    assert pairs(apt_descriptions.build(tmp_path)) == APT_EXPECTED


def test_apt_truncates_long_descriptions_at_a_sentence_end():
    text = " ".join(["This sentence has exactly eight words in it."] * 30)
    cut = apt_descriptions.truncate_words(text, 200)
    assert len(cut.split()) == 200 and cut.endswith("in it.")
    cut = apt_descriptions.truncate_words(text[:-1] + " and " + "more " * 300, 200)
    assert len(cut.split()) <= 200 and cut.endswith(".")


def test_apt_missing_index_and_bad_utf8(tmp_path):
    with pytest.raises(DataError, match="no apt Translation-en index"):
        apt_descriptions.build(tmp_path)
    (tmp_path / "x_main_i18n_Translation-en").write_bytes(b"Package: a\nDescription-en: \xff\xfe\n")
    with pytest.raises(DataError) as err:
        apt_descriptions.build(tmp_path)
    assert err.value.line == 2 and "UTF-8" in str(err.value)


# --- determinism ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, raw", [(ding, "ding"), (chitchat, "chitchat"), (apt_descriptions, "apt")])
def test_builds_are_deterministic(module, raw):
    first, second = module.build(FIXTURES / raw), module.build(FIXTURES / raw)
    assert fingerprint(first) == fingerprint(second)
    assert first == second
