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
class DecodingSearch:
    """Decoding settings to try on the validation split (``--search auto``, the study grid).

    The winner has the best main metric among the candidates that clear the bar, if the task sets one: its
    ``metric`` at least ``min_ratio`` times ``reference_metric`` (both from the task's scores); when none
    does, the one closest to the bar. Ties go to the earlier candidate. Each candidate is a set of RunConfig
    decoding fields on top of the run's own.
    """

    candidates: tuple[dict, ...]
    metric: str | None = None
    reference_metric: str | None = None
    min_ratio: float = 0.0

    def ratio(self, scores: dict) -> float:
        return scores[self.metric] / max(scores[self.reference_metric], 1e-9)

    def choose(self, scored: Sequence[dict], main_metric: str) -> int:
        """Index of the winning candidate, given each candidate's validation scores."""
        passing = [i for i, scores in enumerate(scored) if self.metric is None or self.ratio(scores) >= self.min_ratio]
        if passing:
            return max(passing, key=lambda i: (scored[i][main_metric], -i))
        return max(range(len(scored)), key=lambda i: (self.ratio(scored[i]), -i))

    def describe(self, main_metric: str) -> str:
        if self.metric is None:
            return f"the best {main_metric} on validation"
        return (f"the best {main_metric} on validation among settings with {self.metric} >= {self.min_ratio:g} x "
                f"{self.reference_metric} (if none, the highest {self.metric} / {self.reference_metric})")

    def shown(self, main_metric: str, second_metric: str) -> list[str]:
        """The scores a report shows for each candidate."""
        return list(dict.fromkeys(m for m in (main_metric, second_metric, self.metric, self.reference_metric) if m))


# the original study's two decodings; the better main metric on validation wins
GREEDY_OR_BEAM = DecodingSearch(candidates=({"search": "greedy"}, {"search": "beam", "num_beams": 4}))


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
    decoding_search: DecodingSearch | None = None  # None: --search auto means greedy
