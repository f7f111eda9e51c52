"""English -> German sentence pairs: the example sentences of the Ding dictionary (Debian ``trans-de-en``).

The dictionary file has one entry a line, ``German :: English``; both sides hold the same number of
sub-entries separated by `` | ``, and a sub-entry lists alternatives with ``;``, grammar in ``{…}``, usage
notes in ``[…]`` and comments in ``(…)``. Most sub-entries are words and phrases; a few are whole example
sentences ("Ich platze vor Neugier. :: I'm bursting with curiosity."). Only clean pairs are kept: both sides
look like one full sentence and carry no alternatives, annotations, placeholders or ellipses.

Known defect, left in: a few dictionary entries have the languages the wrong way round (German on the English
side). A stop-word count found 2 such pairs in the committed train split and 1 in the test split (2026-11-27);
they stay, because removing them would change the splits the study's records were scored on.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from peft_nlg.data.io import DataError
from peft_nlg.data.sources import first_file, normalise_space, run

PACKAGE = "trans-de-en"
DICT_PATH = Path("usr/share/trans/de-en")       # inside the extracted package
MIN_WORDS, MAX_WORDS = 3, 40

# Markup, alternatives, placeholders (sth./sb./etw./jdm.) and ellipses: such a side is not one clean sentence.
_NOISE = re.compile(r"[{}\[\]<>();/|~=_@#*\\…]|\.\.|\b(?:sth|sb|sb's|etw|jd|jdm|jdn|jds)\b")
_ENDS = re.compile(r"[.!?]$")
_INNER_STOP = re.compile(r"[.!?] +[A-ZÄÖÜ]")


def dictionary_file(raw_dir: Path) -> Path:
    """The dictionary inside ``raw_dir``: the extracted package, or a bare ``de-en`` copy."""
    hint = f"Ding dictionary not found (run fetch, or apt-get download {PACKAGE} and dpkg -x it there)"
    return first_file(raw_dir, (DICT_PATH, "de-en"), hint)


def fetch(raw_dir: Path) -> None:
    """``apt-get download trans-de-en`` into ``raw_dir`` and extract it there (skipped when already there)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if (raw_dir / DICT_PATH).is_file() or (raw_dir / "de-en").is_file():
        return
    debs = sorted(raw_dir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise DataError(raw_dir, "apt-get not found: the Ding dictionary needs a Debian-based system")
        run(["apt-get", "download", PACKAGE], cwd=raw_dir)
        debs = sorted(raw_dir.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise DataError(raw_dir, f"apt-get download {PACKAGE} left no .deb file")
    run(["dpkg", "-x", str(debs[-1]), str(raw_dir)])
    dictionary_file(raw_dir)


def is_sentence(text: str) -> bool:
    """One full sentence: capital start, final . ! or ?, a few words, no markup or placeholders."""
    if not text or not text[0].isupper() or not _ENDS.search(text):
        return False
    if _NOISE.search(text):
        return False
    return MIN_WORDS <= len(text.split()) <= MAX_WORDS


def parse_line(line: str) -> list[tuple[str, str]]:
    """``(english, german)`` example-sentence pairs of one dictionary line (often none)."""
    line = line.rstrip("\n")
    if not line.strip() or line.startswith("#") or line.count(" :: ") != 1:
        return []
    german, english = line.split(" :: ")
    de_parts, en_parts = german.split(" | "), english.split(" | ")
    if len(de_parts) != len(en_parts):
        return []
    pairs = []
    for de, en in zip(de_parts, en_parts, strict=True):
        de, en = normalise_space(de), normalise_space(en)
        if not (is_sentence(de) and is_sentence(en)):
            continue
        # "Das ist klar. Das liegt auf der Hand." against one English sentence: alternatives, not one pair.
        if len(_INNER_STOP.findall(de)) != len(_INNER_STOP.findall(en)):
            continue
        pairs.append((en, de))
    return pairs


def build(raw_dir: Path) -> list[dict]:
    """Example-sentence pairs in dictionary order: ``src`` English, ``trg`` German, ``group`` the German.

    Grouping by the German sentence keeps two English renderings of it out of different splits.
    """
    path = dictionary_file(raw_dir)
    examples = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, f"not valid UTF-8 (byte {err.start})", line=line_no) from None
            examples.extend({"src": en, "trg": de, "group": de} for en, de in parse_line(line))
    if not examples:
        raise DataError(path, "no example sentences found")
    return examples


def provenance(raw_dir: Path) -> str:
    raw_dir = Path(raw_dir)
    debs = sorted(raw_dir.glob(f"{PACKAGE}_*.deb"))
    version = debs[-1].name.split("_")[1] if debs else "unknown version"
    header = ""
    try:
        with open(dictionary_file(raw_dir), encoding="utf-8") as handle:
            for line in handle:
                if not line.startswith("#"):
                    break
                if line.startswith("# Version ::"):
                    header = f", dictionary {line.split('::', 1)[1].strip()}"
    except DataError:
        pass
    return f"Debian package {PACKAGE} {version}{header} (Ding, https://dict.tu-chemnitz.de/)"
