import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402

TINY_PAIRS = {
    "translation": [("The cat sits on the mat.", "Die Katze sitzt auf der Matte."),
                    ("Where is the station?", "Wo ist der Bahnhof?"),
                    ("The dog plays in the garden.", "Der Hund spielt im Garten."),
                    ("How are you today?", "Wie geht es dir heute?"),
                    ("I am fine, thank you.", "Mir geht es gut, danke.")],
    "dialogue": [("How are you today?", "I am fine, thank you."),
                 ("Hi!\nHello, how are you?", "Great, and you?"),
                 ("Where is the station?", "Just around the corner."),
                 ("Do you like cats?", "Yes, I love them."),
                 ("What did you do today?", "I read a book.")],
    "summarization": [("This package provides a library for parsing text. It is fast and small.", "text parser"),
                      ("A tool to compress files quickly. It supports many formats.", "fast compressor"),
                      ("The dog plays in the garden. It is a tool for dogs.", "dog tool"),
                      ("This package contains the data files for a game.", "game data"),
                      ("A library to read images. Supports PNG and JPEG.", "image reader")],
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """data/<task>/{train,valid,test}.jsonl with a handful of pairs each."""
    root = tmp_path_factory.mktemp("data")
    for task, pairs in TINY_PAIRS.items():
        (root / task).mkdir()
        for split in ("train", "valid", "test"):
            rows = pairs if split == "train" else pairs[:3]
            (root / task / f"{split}.jsonl").write_text(
                "".join(json.dumps({"src": s, "trg": t}) + "\n" for s, t in rows))
    return root
