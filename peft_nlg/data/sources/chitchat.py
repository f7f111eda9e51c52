"""Response generation from the Chit-Chat Challenge conversations (PyPI ``chitchat-dataset==0.9.0``, MIT).

``chitchat_dataset/dataset.json`` maps a conversation id to ``{"messages": [turn, ...]}``, a turn being the
list of messages (``{"text", "timestamp", "sender"}``) one speaker sent in a row. An example is the last
few turns (one a line, a turn's messages joined with a space) -> the next turn, grouped by conversation.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

from peft_nlg.data.io import DataError
from peft_nlg.data.sources import first_file, normalise_space, run

PACKAGE, VERSION = "chitchat-dataset", "0.9.0"
DATA_PATH = Path("chitchat_dataset/dataset.json")
CONTEXT_TURNS = 3           # previous turns shown
MAX_TURN_WORDS = 60         # longer turns are neither targets nor context
MAX_CONTEXT_WORDS = 120     # older turns are dropped beyond this
PER_CONVERSATION = 6        # examples kept per conversation (chosen by hash): ~4k conversations give ~19k


def dataset_file(raw_dir: Path) -> Path:
    hint = f"chitchat dataset not found (run fetch, or pip download {PACKAGE}=={VERSION} and unzip the wheel there)"
    return first_file(raw_dir, (DATA_PATH, "dataset.json"), hint)


def fetch(raw_dir: Path) -> None:
    """``pip download --no-deps chitchat-dataset==0.9.0`` into ``raw_dir`` and unzip it (unless there)."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if (raw_dir / DATA_PATH).is_file() or (raw_dir / "dataset.json").is_file():
        return
    wheels = sorted(raw_dir.glob(f"chitchat_dataset-{VERSION}-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             f"{PACKAGE}=={VERSION}", "-d", str(raw_dir)])
        wheels = sorted(raw_dir.glob(f"chitchat_dataset-{VERSION}-*.whl"))
        if not wheels:
            raise DataError(raw_dir, f"pip download {PACKAGE}=={VERSION} left no wheel")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extract(DATA_PATH.as_posix(), raw_dir)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(wheels[-1], f"not a usable wheel ({err})") from None


def _turn_text(path: Path, conv_id: str, turn: object) -> str:
    if not isinstance(turn, list):
        raise DataError(path, f"conversation {conv_id}: a turn is not a list of messages", field="messages")
    texts = []
    for message in turn:
        if not isinstance(message, dict) or not isinstance(message.get("text"), str):
            raise DataError(path, f"conversation {conv_id}: a message has no text", field="text")
        text = normalise_space(message["text"])
        if text:
            texts.append(text)
    return " ".join(texts)


def _usable(turn: str, max_words: int) -> bool:
    return bool(turn) and len(turn.split()) <= max_words


def conversation_examples(conv_id: str, turns: list[str], context_turns: int = CONTEXT_TURNS,
                          max_turn_words: int = MAX_TURN_WORDS,
                          max_context_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """Every (context -> next turn) example of one conversation, in turn order."""
    examples = []
    for i in range(1, len(turns)):
        if not _usable(turns[i], max_turn_words):
            continue
        context: list[str] = []
        words = 0
        for turn in reversed(turns[max(0, i - context_turns):i]):
            too_long = bool(context) and words + len(turn.split()) > max_context_words
            if too_long or not _usable(turn, max_turn_words):
                break
            context.insert(0, turn)
            words += len(turn.split())
        if context:
            examples.append({"src": "\n".join(context), "trg": turns[i], "group": conv_id})
    return examples


def _pick(examples: list[dict], k: int | None) -> list[dict]:
    """``k`` examples of one conversation chosen by a hash of their text (stable), kept in turn order."""
    if k is None or len(examples) <= k:
        return examples
    def rank(item):
        return hashlib.sha256(f"{item[1]['group']}\n{item[1]['src']}".encode()).hexdigest()
    chosen = sorted(sorted(enumerate(examples), key=rank)[:k])
    return [example for _, example in chosen]


def build(raw_dir: Path, context_turns: int = CONTEXT_TURNS, per_conversation: int | None = PER_CONVERSATION,
          max_turn_words: int = MAX_TURN_WORDS, max_context_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """Examples of all conversations in conversation-id order (``per_conversation=None`` keeps them all)."""
    path = dataset_file(raw_dir)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"malformed JSON ({err.msg}, column {err.colno})", line=err.lineno) from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object mapping conversation ids to conversations")
    examples = []
    for conv_id in sorted(data):
        conversation = data[conv_id]
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise DataError(path, f"conversation {conv_id}: missing or not a list", field="messages")
        turns = [_turn_text(path, conv_id, turn) for turn in conversation["messages"]]
        found = conversation_examples(conv_id, turns, context_turns, max_turn_words, max_context_words)
        examples.extend(_pick(found, per_conversation))
    if not examples:
        raise DataError(path, "no usable conversation turns found")
    return examples


def provenance(raw_dir: Path) -> str:
    return (f"PyPI package {PACKAGE}=={VERSION} (Chit-Chat Challenge, BYU Perception, Control and Cognition "
            f"lab; MIT license)")
