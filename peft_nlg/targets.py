"""The study's quality targets (``defaults/targets.yaml``), checked against run records by ``peft-nlg report``.

Each check kind is one function from (its settings, the table's records) to result rows; a target whose
records do not exist yet is listed as such, so a partial study shows what is pending, not a pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from peft_nlg.config import yaml_defaults
from peft_nlg.evaluation import ZERO_SHOT
from peft_nlg.methods import METHODS
from peft_nlg.tasks import TASKS

Table = dict[tuple[str, str], dict]  # (method, task) -> the test record shown in the results table


@dataclass(frozen=True)
class Outcome:
    target: str           # what was asked, in words
    task: str
    method: str
    value: str            # what the records give ("" without a record)
    verdict: str          # met, missed or "no record"


def _score(table: Table, method: str, task: str, metric: str | None = None) -> float | None:
    record = table.get((method, task))
    return None if record is None else record["scores"].get(metric or TASKS[task].main_metric)


def _outcome(target: str, task: str, method: str, value: float | None, goal_met: Callable[[float], bool],
             shown: str = "") -> Outcome:
    if value is None:
        return Outcome(target, task, method, "", "no record")
    return Outcome(target, task, method, shown or f"{value:g}", "met" if goal_met(value) else "missed")


def _versus(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return ""
    relative = f" ({value / reference - 1:+.1%})" if reference else ""
    return f"{value:g} vs {reference:g}{relative}"


def _beats_zero_shot(spec: dict, table: Table) -> Iterator[Outcome]:
    for task in TASKS:
        floor = _score(table, ZERO_SHOT, task)
        metric = TASKS[task].main_metric
        for method in METHODS:  # every method, so a missing record shows as one
            value = _score(table, method, task)
            yield _outcome(f"{metric} above zero-shot ({'–' if floor is None else f'{floor:g}'})", task, method,
                           None if floor is None else value, lambda v, floor=floor: v > floor)


def _close_to(spec: dict, table: Table) -> Iterator[Outcome]:
    gap = float(spec["max_gap"])
    for task in TASKS:
        reference, value = _score(table, spec["of"], task), _score(table, spec["method"], task)
        shown = _versus(value, reference)
        yield _outcome(f"{TASKS[task].main_metric} within {gap:.0%} of {spec['of']}", task, spec["method"],
                       None if reference is None else value,
                       lambda v, reference=reference: v >= (1 - gap) * reference, shown)


def _at_least(spec: dict, table: Table) -> Iterator[Outcome]:
    for method in spec["methods"]:
        yield _outcome(f"{spec['metric']} ≥ {spec['value']:g}", spec["task"], method,
                       _score(table, method, spec["task"], spec["metric"]), lambda v: v >= float(spec["value"]))


def _near_reference(spec: dict, table: Table) -> Iterator[Outcome]:
    gap, task = float(spec["max_gap"]), spec["task"]
    for method in METHODS:  # every method, so a missing record shows as one
        record = table.get((method, task))
        value = _score(table, method, task, spec["metric"])
        reference = record["scores"].get(spec["reference"]) if record else None
        yield _outcome(f"{spec['metric']} within {gap:.0%} of the references'", task, method, value,
                       lambda v, reference=reference: abs(v - reference) <= gap * reference,
                       _versus(value, reference))


CHECKS: dict[str, Callable[[dict, Table], Iterator[Outcome]]] = {
    "beats_zero_shot": _beats_zero_shot, "close_to": _close_to, "at_least": _at_least,
    "near_reference": _near_reference,
}


def load_targets() -> list[dict]:
    return validate_targets(yaml_defaults("targets.yaml") or [], "defaults/targets.yaml")


def validate_targets(targets: list[dict], source: str) -> list[dict]:
    """A typo in a check, task or method name would otherwise make a target silently vanish or never pass."""
    for number, spec in enumerate(targets, 1):
        where = f"{source}: target {number}"
        if spec.get("check") not in CHECKS:
            raise ValueError(f"{where}: check must be one of {', '.join(CHECKS)}, not {spec.get('check')!r}")
        if spec.get("task", next(iter(TASKS))) not in TASKS:
            raise ValueError(f"{where}: unknown task {spec['task']!r}")
        for key in ("method", "of"):
            if key in spec and spec[key] not in METHODS:
                raise ValueError(f"{where}: unknown method {spec[key]!r} in {key}")
        unknown = [m for m in spec.get("methods", []) if m not in METHODS]
        if unknown:
            raise ValueError(f"{where}: unknown method(s) {', '.join(unknown)}")
    return targets


def check_targets(table: Table, targets: list[dict]) -> list[Outcome]:
    return [outcome for spec in targets for outcome in CHECKS[spec["check"]](spec, table)]
