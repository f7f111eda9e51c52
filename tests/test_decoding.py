"""Decoding: seeded sampling, and `--search auto`, which picks a task's decoding on the validation split by the
task's declared rule and never looks at the test split."""

import dataclasses
import io
import json
import shutil

import pytest
import torch
import yaml

from peft_nlg import cli
from peft_nlg.config import build_config
from peft_nlg.data.io import read_pairs
from peft_nlg.data.splits import fingerprint
from peft_nlg.evaluation import SEARCH_FILE, inference
from peft_nlg.generation import DecodingSettings, generate
from peft_nlg.runtime import device, load_base
from peft_nlg.tasks import TASKS
from peft_nlg.tasks.base import DecodingSearch

RULE = DecodingSearch(candidates=({}, {}, {}), metric="d2", reference_metric="ref_d2", min_ratio=0.8)


def test_rule_best_main_metric_among_settings_that_pass():
    scored = [{"rougeL": 10.0, "d2": 50, "ref_d2": 100},   # best main metric, far too repetitive
              {"rougeL": 8.0, "d2": 80, "ref_d2": 100},    # passes exactly at the bar
              {"rougeL": 7.0, "d2": 95, "ref_d2": 100}]    # passes, lower main metric
    assert RULE.choose(scored, "rougeL") == 1
    scored[2]["rougeL"] = 8.0  # a tie goes to the earlier (simpler) setting
    assert RULE.choose(scored, "rougeL") == 1


def test_rule_when_none_passes_takes_the_closest_to_the_bar():
    scored = [{"rougeL": 10.0, "d2": 50, "ref_d2": 100}, {"rougeL": 6.0, "d2": 70, "ref_d2": 100},
              {"rougeL": 9.0, "d2": 60, "ref_d2": 100}]
    assert RULE.choose(scored, "rougeL") == 1


def test_rule_without_a_bar_takes_the_best_main_metric():
    rule = DecodingSearch(candidates=({}, {}, {}))
    scored = [{"bleu": 3.0, "chrf": 20.0}, {"bleu": 3.5, "chrf": 19.0}, {"bleu": 3.5, "chrf": 21.0}]
    assert rule.choose(scored, "bleu") == 1  # the main metric decides; a tie goes to the earlier setting
    assert rule.describe("bleu") == "the best bleu on validation"
    assert rule.shown("bleu", "chrf") == ["bleu", "chrf"]
    assert RULE.shown("rougeL", "d2") == ["rougeL", "d2", "ref_d2"]


def test_dialogue_search_tries_greedy_first_and_uses_the_study_bar():
    search = TASKS["dialogue"].decoding_search
    assert search.candidates[0] == {"search": "greedy"}
    assert {c["search"] for c in search.candidates[1:]} == {"sample"}
    for candidate in search.candidates:
        build_config({"task": "dialogue", **candidate})  # every candidate is a valid setting
    # the bar is the dialogue target's (defaults/targets.yaml), so the two cannot drift apart
    from importlib import resources
    targets = yaml.safe_load(resources.files("peft_nlg").joinpath("defaults", "targets.yaml").read_text())
    bar = next(t for t in targets if t["check"] == "near_reference" and t["task"] == "dialogue")
    assert (bar["metric"], bar["reference"]) == (search.metric, search.reference_metric)
    assert search.min_ratio == pytest.approx(1 - bar["max_gap"])
    for name in ("translation", "summarization"):  # the better of greedy and beam search, no bar
        search = TASKS[name].decoding_search
        assert [c["search"] for c in search.candidates] == ["greedy", "beam"] and search.metric is None


def test_sampling_is_seeded(tiny_models, tiny_data):
    config = build_config({"task": "dialogue", "model": str(tiny_models["llama"]), "data_dir": str(tiny_data)})
    dev = device()
    loaded = load_base(config, dev, torch.float32)
    sources = ["How are you today?", "Where is the station?", "Hi!"]

    def run(**settings):
        outputs, _ = generate(loaded.model, loaded.tokenizer, loaded.prompter, sources,
                              DecodingSettings(max_new_tokens=8, **settings), dev, show_progress=False)
        return outputs

    sampled = run(search="sample", temperature=1.0, seed=0)
    assert run(search="sample", temperature=1.0, seed=0) == sampled  # same seed, same machine: same outputs
    assert run(search="sample", temperature=1.0, seed=1) != sampled
    assert run(search="greedy") == run(search="greedy", seed=1)  # the seed only matters when sampling
    assert DecodingSettings(search="sample", temperature=0.7, top_p=0.9).describe() == "sample T0.7 p0.9"


def test_search_auto_chooses_on_validation_and_inference_reuses_it(tiny_models, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    valid = data / "dialogue" / "valid.jsonl"  # validation differs from test here, so the fingerprints tell
    valid.write_text("".join(json.dumps({"src": f"Question {i}?", "trg": f"Answer {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "dialogue", "--method", "lora", "--model", str(tiny_models["llama"]),
                     "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "2",
                     "--report-to", "none"]) == 0
    test_args = ["test", "--task", "dialogue", "--method", "lora", "--data-dir", str(data), "--output-dir", str(out),
                 "--search", "auto", "--max-new-tokens", "6"]
    assert cli.main(test_args) == 0

    searched = json.loads((out / SEARCH_FILE).read_text())
    task = TASKS["dialogue"]
    assert [c["decoding"] for c in searched["candidates"]] == list(task.decoding_search.candidates)
    assert searched["valid_examples"] == 4
    assert searched["valid_fingerprint"] == fingerprint(read_pairs(valid))
    assert searched["valid_fingerprint"] != fingerprint(read_pairs(data / "dialogue" / "test.jsonl"))
    winner = task.decoding_search.choose([c["scores"] for c in searched["candidates"]], task.main_metric)
    assert searched["chosen"] == task.decoding_search.candidates[winner]
    chosen = searched["chosen"]
    record = json.loads((out / f"record-test-{chosen['search']}.json").read_text())
    assert record["decoding_search"] == searched
    assert {k: record["decoding"][k] for k in chosen} == chosen  # the test used the winner
    # and its scores are the test split's, not the validation's
    assert record["test_fingerprint"] == fingerprint(read_pairs(data / "dialogue" / "test.jsonl"))

    assert cli.main(test_args) == 2  # an earlier search is not replaced silently
    config = build_config({"task": "dialogue", "method": "lora", "output_dir": str(out), "data_dir": str(data),
                           "search": "auto", "max_new_tokens": 4})
    stdout = io.StringIO()
    inference(config, stdin=io.StringIO("Hello there\n"), stdout=stdout)
    assert len(stdout.getvalue().splitlines()) == 1


def test_search_auto_picks_greedy_or_beam_for_translation(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "zs"
    assert cli.main(["test", "--zero-shot", "--task", "translation", "--model", str(tiny_models["t5"]),
                     "--data-dir", str(tiny_data), "--output-dir", str(out), "--search", "auto",
                     "--max-new-tokens", "4"]) == 0
    searched = json.loads((out / SEARCH_FILE).read_text())
    assert [c["name"] for c in searched["candidates"]] == ["greedy", "beam 4"]
    assert searched["shown"] == ["bleu", "chrf"] and searched["rule"] == "the best bleu on validation"
    scores = [c["scores"]["bleu"] for c in searched["candidates"]]
    assert searched["chosen_name"] == ("beam 4" if scores[1] > scores[0] else "greedy")
    record = json.loads((out / f"record-test-{searched['chosen']['search']}.json").read_text())
    assert record["decoding"]["search"] == searched["chosen"]["search"]


def test_search_auto_is_greedy_where_the_task_declares_no_search(tiny_models, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "translation", dataclasses.replace(TASKS["translation"], decoding_search=None))
    out = tmp_path / "zs"
    assert cli.main(["test", "--zero-shot", "--task", "translation", "--model", str(tiny_models["t5"]),
                     "--data-dir", str(tiny_data), "--output-dir", str(out), "--search", "auto",
                     "--max-new-tokens", "4"]) == 0
    record = json.loads((out / "record-test-greedy.json").read_text())
    assert record["decoding"]["search"] == "greedy" and record["decoding_search"]["candidates"] == []


def test_inference_auto_needs_a_search_first(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "dialogue", "--method", "ia3", "--model", str(tiny_models["llama"]),
                     "--data-dir", str(tiny_data), "--output-dir", str(out), "--max-steps", "1",
                     "--report-to", "none"]) == 0
    config = build_config({"task": "dialogue", "method": "ia3", "output_dir": str(out), "search": "auto"})
    with pytest.raises(FileNotFoundError, match="peft-nlg test --search auto"):
        inference(config, stdin=io.StringIO("Hi\n"), stdout=io.StringIO())
