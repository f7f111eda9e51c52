"""The quality-target checks: each verdict follows from the scores, and a missing record is never a pass."""

import pytest

from peft_nlg.targets import check_targets, load_targets, validate_targets


def _record(**scores):
    return {"scores": scores}


TARGETS = [{"check": "beats_zero_shot"}, {"check": "close_to", "method": "lora", "of": "none", "max_gap": 0.05},
           {"check": "at_least", "task": "translation", "metric": "chrf", "value": 40, "methods": ["none", "lora"]},
           {"check": "near_reference", "task": "dialogue", "metric": "distinct2", "reference": "ref_distinct2",
            "max_gap": 0.2}]


def _verdicts(table):
    return {(o.target.split()[0] + ("" if "zero-shot" not in o.target else "/zs"), o.task, o.method): o.verdict
            for o in check_targets(table, TARGETS)}


def test_verdicts_follow_the_scores():
    table = {("zero_shot", "translation"): _record(bleu=1.0, chrf=15.0),
             ("none", "translation"): _record(bleu=20.0, chrf=45.0),
             ("lora", "translation"): _record(bleu=18.9, chrf=39.9),   # 5.5% below full: misses "close to"
             ("ia3", "translation"): _record(bleu=0.5, chrf=10.0),     # below zero-shot
             ("lora", "dialogue"): _record(rougeL=10.0, distinct2=30.0, ref_distinct2=40.0),  # 25% under
             ("none", "dialogue"): _record(rougeL=11.0, distinct2=45.0, ref_distinct2=40.0)}  # 12.5% over
    v = _verdicts(table)
    assert v[("bleu/zs", "translation", "none")] == "met"
    assert v[("bleu/zs", "translation", "ia3")] == "missed"
    assert v[("bleu/zs", "translation", "prompt_tuning")] == "no record"
    assert v[("rougeL/zs", "dialogue", "lora")] == "no record"  # no zero-shot floor for dialogue yet
    assert v[("bleu", "translation", "lora")] == "missed"      # the close_to check on the main metric
    assert v[("chrf", "translation", "none")] == "met" and v[("chrf", "translation", "lora")] == "missed"
    assert v[("distinct2", "dialogue", "none")] == "met" and v[("distinct2", "dialogue", "lora")] == "missed"
    assert v[("distinct2", "dialogue", "ia3")] == "no record"


def test_close_to_passes_within_the_gap_and_shows_the_numbers():
    table = {("none", "summarization"): _record(rouge2=20.0), ("lora", "summarization"): _record(rouge2=19.2)}
    outcome = next(o for o in check_targets(table, TARGETS[1:2]) if o.task == "summarization")
    assert outcome.verdict == "met" and outcome.value == "19.2 vs 20 (-4.0%)"


def test_committed_targets_are_valid_and_typos_are_refused():
    assert load_targets()  # the committed file parses and names real tasks, methods and checks
    with pytest.raises(ValueError, match="target 1: unknown method 'lroa'"):
        validate_targets([{"check": "close_to", "method": "lroa", "of": "none", "max_gap": 0.05}], "t.yaml")
    with pytest.raises(ValueError, match="check must be one of"):
        validate_targets([{"check": "beat_zero_shot"}], "t.yaml")
    with pytest.raises(ValueError, match="unknown task 'translate'"):
        validate_targets([{"check": "at_least", "task": "translate", "metric": "chrf", "value": 1,
                           "methods": ["none"]}], "t.yaml")


def test_a_zero_reference_is_a_verdict_not_a_crash():
    table = {("none", "translation"): _record(bleu=0.0), ("lora", "translation"): _record(bleu=0.0)}
    outcome = next(o for o in check_targets(table, TARGETS[1:2]) if o.task == "translation")
    assert outcome.verdict == "met" and outcome.value == "0 vs 0"
