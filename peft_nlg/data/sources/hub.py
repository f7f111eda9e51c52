"""The original study's data through ``datasets.load_dataset``, reduced to ``{"src", "trg"}`` examples.

``path=None`` loads from the Hugging Face hub; a local directory works the same way when it has the hub
repository's layout: its ``README.md`` (whose YAML ``configs:`` names the data files) and data files, e.g.
``de-en/train-00000-of-00001.parquet``. Without a README, a ``<config>/`` subdirectory is used as
``data_dir``, and for DailyDialog the parquet-export layout ``default/{train,validation,test}/0000.parquet``
(or ``train.json``, ...) is found by ``datasets``' split-name inference.

Filters follow the original study: empty and over-long examples dropped, articles truncated, DailyDialog
turned into consecutive-turn pairs, and split sizes capped (train: a seeded random subset; valid/test: the
first examples in the split's order).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from peft_nlg.data.io import DataError
from peft_nlg.data.sources import normalise_space

SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
TRAIN_CAP, VALID_CAP, TEST_CAP = 20_000, 500, 1_000

WMT14_ID, WMT14_CONFIG = "wmt/wmt14", "de-en"
DAILY_DIALOG_ID = "li2017dailydialog/daily_dialog"
CNN_DM_ID, CNN_DM_CONFIG = "abisee/cnn_dailymail", "3.0.0"

MAX_SENTENCE_WORDS = 100     # translation: either side longer is dropped
MAX_LENGTH_RATIO = 3.0       # translation: misaligned pairs
MAX_TURN_WORDS = 60          # dialogue
MAX_ARTICLE_WORDS = 400      # summarization: articles are truncated to this
MIN_ARTICLE_WORDS = 30
MAX_HIGHLIGHT_WORDS = 120


def _load(path: str | None, hub_id: str, config: str | None = None, cache_dir: str | None = None,
          revision: str | None = None):
    """``datasets.load_dataset`` for the hub id or a local copy of the repository; errors become DataError."""
    import datasets

    target = hub_id if path is None else str(path)
    kwargs: dict = {"cache_dir": cache_dir}
    if revision is not None:
        kwargs["revision"] = revision
    name = config
    if path is not None:
        local = Path(path)
        if not local.exists():
            raise DataError(local, "dataset directory not found")
        if config is not None and not (local / "README.md").is_file() and (local / config).is_dir():
            name, kwargs["data_dir"] = None, config     # a copy of the data files without the repo's README
    try:
        if name:
            loaded = datasets.load_dataset(target, name, **kwargs)
        else:
            loaded = datasets.load_dataset(target, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(target, f"cannot load dataset: {first}") from err
    return loaded


def _splits(loaded, target: str) -> dict:
    found = {}
    for name in loaded:
        if name in SPLIT_NAMES:
            found[SPLIT_NAMES[name]] = loaded[name]
    missing = [s for s in ("train", "valid", "test") if s not in found]
    if missing:
        found_names = ", ".join(loaded) or "none"
        raise DataError(target, f"missing split(s) {', '.join(missing)} (found {found_names})")
    return found


def _column(ds, field: str, target: str, split: str):
    if field not in ds.column_names:
        columns = ", ".join(ds.column_names)
        raise DataError(target, f"missing in split '{split}' (columns: {columns})", field=field)


def _train_rows(ds, cap: int | None, seed: int):
    """Rows of a training split in a seeded random order (all of them, lazily, when there is no cap)."""
    n = len(ds)
    if cap is None or n <= 2 * cap:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    else:                                   # a few million rows: draw a generous sample, filter it, cap it
        order = random.Random(seed).sample(range(n), 2 * cap)
    for start in range(0, len(order), 1000):
        yield from ds.select(order[start:start + 1000])


def _collect(rows, convert, cap: int | None) -> list[dict]:
    out: list[dict] = []
    for row in rows:
        if cap is not None and len(out) >= cap:
            break
        out.extend(convert(row))
    return out[:cap] if cap is not None else out


def _capped(splits: dict, convert, caps: dict, seed: int) -> dict[str, list[dict]]:
    result = {}
    for split in ("train", "valid", "test"):
        rows = _train_rows(splits[split], caps[split], seed) if split == "train" else iter(splits[split])
        result[split] = _collect(rows, convert, caps[split])
    return result


def _require_examples(result: dict, target: str) -> dict:
    for split, examples in result.items():
        if not examples:
            raise DataError(target, f"no usable examples in split '{split}' after filtering")
    return result


# --- WMT14 English -> German ---------------------------------------------------------------------------

def _wmt_pair(row: dict) -> list[dict]:
    pair = row.get("translation") or {}
    en, de = normalise_space(pair.get("en") or ""), normalise_space(pair.get("de") or "")
    if not en or not de:
        return []
    n_en, n_de = len(en.split()), len(de.split())
    if max(n_en, n_de) > MAX_SENTENCE_WORDS or max(n_en, n_de) > MAX_LENGTH_RATIO * min(n_en, n_de) + 2:
        return []
    return [{"src": en, "trg": de}]


def load_wmt14_de_en(path: str | None = None, *, train_cap: int | None = TRAIN_CAP,
                     valid_cap: int | None = VALID_CAP, test_cap: int | None = TEST_CAP, seed: int = 0,
                     cache_dir: str | None = None) -> dict[str, list[dict]]:
    """WMT14 de-en (train: Europarl/CommonCrawl/News Commentary; valid: newstest2013; test: newstest2014)."""
    target = WMT14_ID if path is None else str(path)
    splits = _splits(_load(path, WMT14_ID, WMT14_CONFIG, cache_dir), target)
    for split, ds in splits.items():
        _column(ds, "translation", target, split)
    caps = {"train": train_cap, "valid": valid_cap, "test": test_cap}
    return _require_examples(_capped(splits, _wmt_pair, caps, seed), target)


# --- DailyDialog ---------------------------------------------------------------------------------------

def _dialog_pairs(row: dict) -> list[dict]:
    turns = row.get("dialog")
    if turns is None:
        turns = row.get("utterances") or []
    turns = [normalise_space(t) if isinstance(t, str) else "" for t in turns]
    group = hashlib.sha256("\n".join(turns).encode("utf-8")).hexdigest()[:16]
    pairs = []
    for prev, nxt in zip(turns[:-1], turns[1:], strict=True):
        if prev and nxt and len(prev.split()) <= MAX_TURN_WORDS and len(nxt.split()) <= MAX_TURN_WORDS:
            pairs.append({"src": prev, "trg": nxt, "group": group})
    return pairs


def load_daily_dialog(path: str | None = None, *, train_cap: int | None = TRAIN_CAP,
                      valid_cap: int | None = VALID_CAP, test_cap: int | None = TEST_CAP, seed: int = 0,
                      cache_dir: str | None = None) -> dict[str, list[dict]]:
    """DailyDialog (fields ``dialog``: list of utterances, ``act``, ``emotion``) as consecutive-turn pairs.

    ``group`` identifies the dialogue (a hash of its text). The hub repository still holds a loading script,
    which ``datasets`` >= 4 refuses; its parquet export (``refs/convert/parquet``) is tried next.
    """
    target = DAILY_DIALOG_ID if path is None else str(path)
    try:
        loaded = _load(path, DAILY_DIALOG_ID, None, cache_dir)
    except DataError as err:
        if path is not None or "scripts are no longer supported" not in str(err):
            raise
        loaded = _load(None, DAILY_DIALOG_ID, None, cache_dir, revision="refs/convert/parquet")
    splits = _splits(loaded, target)
    for split, ds in splits.items():
        if "dialog" not in ds.column_names and "utterances" not in ds.column_names:
            _column(ds, "dialog", target, split)
    caps = {"train": train_cap, "valid": valid_cap, "test": test_cap}
    return _require_examples(_capped(splits, _dialog_pairs, caps, seed), target)


# --- CNN/DailyMail -------------------------------------------------------------------------------------

def _cnn_pair(row: dict) -> list[dict]:
    article = normalise_space(row.get("article") or "")
    highlights = normalise_space(row.get("highlights") or "")
    words = article.split()
    if len(words) < MIN_ARTICLE_WORDS or not highlights or len(highlights.split()) > MAX_HIGHLIGHT_WORDS:
        return []
    return [{"src": " ".join(words[:MAX_ARTICLE_WORDS]), "trg": highlights}]


def load_cnn_dailymail(path: str | None = None, *, train_cap: int | None = TRAIN_CAP,
                       valid_cap: int | None = VALID_CAP, test_cap: int | None = TEST_CAP, seed: int = 0,
                       cache_dir: str | None = None) -> dict[str, list[dict]]:
    """CNN/DailyMail 3.0.0 (fields ``article``, ``highlights``, ``id``); articles cut to 400 words."""
    target = CNN_DM_ID if path is None else str(path)
    splits = _splits(_load(path, CNN_DM_ID, CNN_DM_CONFIG, cache_dir), target)
    for split, ds in splits.items():
        _column(ds, "article", target, split)
        _column(ds, "highlights", target, split)
    caps = {"train": train_cap, "valid": valid_cap, "test": test_cap}
    return _require_examples(_capped(splits, _cnn_pair, caps, seed), target)
