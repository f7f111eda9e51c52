"""Summarization pairs from Debian package descriptions: the long description -> the one-line synopsis.

Source: the apt ``Translation-en`` indexes of Debian bookworm ``main`` (plus -updates and -security), one
deb822 stanza a package::

    Package: 2ping
    Description-md5: 2543c220a763445976d1348c5b593743
    Description-en: Ping utility to determine directional packet loss     <- synopsis (trg)
     2ping is a bi-directional ping utility. It uses 3-way pings ...       <- long description (src)
     .                                                                     <- paragraph break
      * a bullet item

Packages from one family (libfoo1, libfoo-dev, foo-doc, ...) share their opening and differ by a sentence,
so only one description per opening is kept: near-copies would leak across splits.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
from pathlib import Path

from peft_nlg.data.io import DataError
from peft_nlg.data.sources import normalise_space, run

LISTS_DIR = Path("/var/lib/apt/lists")
INDEX_GLOB = "*_main_i18n_Translation-en*"
RELEASE_GLOB = "*_InRelease"
MIN_WORDS = 10          # shorter long descriptions say too little to summarise
MAX_WORDS = 200         # longer ones are cut at the last sentence end before this
FAMILY_WORDS = 15       # descriptions opening with the same words are near-copies: one is kept
_BULLET = re.compile(r"^\s*(?:[-*+o•]|\d{1,2}[.)])\s+")
_BOILERPLATE = re.compile(r"\b(?:transitional|dummy) package\b|\bcan (?:safely )?be removed\b"
                          r"|^This metapackage enables feature", re.I)
_SENTENCE_END = re.compile(r"[.!?][\"')]?$")
_VARIANT = re.compile(r"\S*(?:\d|\w[+\-_/.:]+\w)\S*")   # version-, arch- and name-like tokens


def index_files(raw_dir: Path) -> list[Path]:
    files = sorted(p for p in Path(raw_dir).glob("*Translation-en*")
                   if p.is_file() and not p.name.endswith(".tmp"))
    if not files:
        raise DataError(raw_dir, "no apt Translation-en index found (run fetch, or copy "
                                 f"{LISTS_DIR}/{INDEX_GLOB} there)")
    return files


def fetch(raw_dir: Path) -> None:
    """Refresh apt's English description indexes and copy them (and the Release files) into ``raw_dir``.

    Skipped when ``raw_dir`` already holds a Translation-en index. Needs root for ``apt-get update``.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if any(raw_dir.glob("*Translation-en*")):
        return
    if shutil.which("apt-get") is None:
        raise DataError(raw_dir, "apt-get not found: the package descriptions need a Debian-based system")
    run(["apt-get", "update", "-o", "Acquire::Languages=en"])
    found = sorted(LISTS_DIR.glob(INDEX_GLOB))
    if not found:
        raise DataError(LISTS_DIR, f"apt-get update left no {INDEX_GLOB} (is the main component enabled?)")
    for path in found + sorted(LISTS_DIR.glob(RELEASE_GLOB)):
        shutil.copyfile(path, raw_dir / path.name)


def read_index(path: Path) -> str:
    """The text of an index file: plain, .lz4 (through ``lz4cat``), .gz or .xz."""
    if path.suffix == ".lz4":
        if shutil.which("lz4cat") is None:
            raise DataError(path, "lz4cat not found (apt-get install lz4), or give an uncompressed copy")
        raw = run(["lz4cat", str(path)])
    elif path.suffix == ".gz":
        raw = gzip.decompress(path.read_bytes())
    elif path.suffix == ".xz":
        raw = lzma.decompress(path.read_bytes())
    else:
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte {err.start})", line=line) from None


def parse_stanzas(text: str) -> list[dict]:
    """``{"package", "md5", "synopsis", "body"}`` per stanza; ``body`` keeps the continuation lines."""
    stanzas = []
    for block in re.split(r"\n[ \t]*\n", text):
        fields: dict = {"body": []}
        for line in block.split("\n"):
            if line.startswith((" ", "\t")):
                fields["body"].append(line[1:])
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if fields.get("package") and fields.get("description-en") is not None:
            stanzas.append({"package": fields["package"], "md5": fields.get("description-md5", ""),
                            "synopsis": normalise_space(fields["description-en"]), "body": fields["body"]})
    return stanzas


def paragraphs(body: list[str]) -> list[str]:
    """The long description as plain paragraphs; a bullet list becomes ``intro: item; item; item.``"""
    result = []
    for block in "\n".join(body).split("\n.\n") if body else []:
        lines = [line for line in block.split("\n") if line.strip() not in ("", ".")]
        text, items = [], []
        for line in lines:
            match = _BULLET.match(line)
            if match:
                items.append(line[match.end():].strip())
            elif items and line.startswith("  "):        # continuation of a bullet item
                items[-1] += " " + line.strip()
            else:
                if items:
                    text.append(_join_items(items))
                    items = []
                text.append(line.strip())
        if items:
            text.append(_join_items(items))
        paragraph = normalise_space(" ".join(text))
        if paragraph:
            result.append(paragraph)
    return result


def _join_items(items: list[str]) -> str:
    items = [normalise_space(item).rstrip(";,.") for item in items if item.strip()]
    return "; ".join(items) + "." if items else ""


def truncate_words(text: str, max_words: int = MAX_WORDS) -> str:
    """``text`` if short enough, else cut at the last sentence end within ``max_words`` (or at the limit)."""
    words = text.split()
    if len(words) <= max_words:
        return text
    words = words[:max_words]
    for end in range(len(words), max_words // 2, -1):
        if _SENTENCE_END.search(words[end - 1]):
            return " ".join(words[:end])
    return " ".join(words)


def stanza_example(stanza: dict) -> dict | None:
    synopsis = stanza["synopsis"]
    paras = paragraphs(stanza["body"])
    if not paras or len(synopsis.split()) < 2:
        return None
    src = truncate_words(" ".join(paras))
    if len(src.split()) < MIN_WORDS or _BOILERPLATE.search(src) or _BOILERPLATE.search(synopsis):
        return None
    # The family: the opening words (at most the first paragraph), versions and architectures masked, so that
    # linux-image-6.1.0-amd64 / -arm64 or libfoo1 / libfoo-dev ("Foo is ... This package contains ...") match.
    opening = _VARIANT.sub("#", src.lower()).split()[:min(FAMILY_WORDS, len(paras[0].split()))]
    family = " ".join(opening)
    return {"src": src, "trg": synopsis, "family": family, "package": stanza["package"]}


def build(raw_dir: Path) -> list[dict]:
    """One example per family (first paragraph, versions and architectures masked), sorted by package.

    The family's example comes from its package with the shortest name (``foo`` rather than ``foo-data``).

    Stanzas are read from every index in ``raw_dir`` (file-name order); a package listed in several (bookworm,
    -updates, -security) with the same description counts once.
    """
    seen: set[tuple[str, str]] = set()
    candidates = []
    for path in index_files(raw_dir):
        for stanza in parse_stanzas(read_index(path)):
            key = (stanza["package"], stanza["md5"] or "\n".join(stanza["body"]))
            if key in seen:
                continue
            seen.add(key)
            example = stanza_example(stanza)
            if example is not None:
                candidates.append(example)
    if not candidates:
        raise DataError(raw_dir, "no usable package descriptions found")
    candidates.sort(key=lambda e: (len(e["package"]), e["package"], e["src"], e["trg"]))
    kept: dict[str, dict] = {}
    for example in candidates:
        kept.setdefault(example["family"], example)
    ordered = sorted(kept.values(), key=lambda e: (e["package"], e["src"]))
    return [{"src": e["src"], "trg": e["trg"]} for e in ordered]


def provenance(raw_dir: Path) -> str:
    raw_dir = Path(raw_dir)
    suites = []
    for release in sorted(raw_dir.glob(RELEASE_GLOB)):
        info = {}
        lines = release.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].startswith("-----BEGIN PGP"):          # clearsigned: skip the armour header
            lines = lines[lines.index("") + 1:] if "" in lines else []
        for line in lines:
            if line.startswith(("Suite:", "Codename:", "Version:", "Date:")):
                key, value = line.split(":", 1)
                info.setdefault(key, value.strip())
            if not line.strip():
                break
        if info:
            suites.append(f"{info.get('Codename', '?')} ({info.get('Suite', '?')}, {info.get('Date', '?')})")
    names = ", ".join(p.name for p in index_files(raw_dir))
    where = "; ".join(suites) if suites else "release dates unknown"
    return f"Debian apt Translation-en indexes: {names}; {where}"
