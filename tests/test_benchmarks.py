"""The committed benchmark results stay renderable: docs/benchmarks.md's tables come from them."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark_module(name: str):
    return _load_module(ROOT / "benchmarks" / f"{name}.py")


def _speed_module():
    return _benchmark_module("speed")


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_committed_result_renders_one_row_per_method(path):
    results = json.loads(path.read_text())
    lines = _speed_module().markdown_table(results).splitlines()
    columns = lines[0].count("|")
    assert lines[1].count("|") == columns
    rows = lines[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(results["methods"])
    for row, method in zip(rows, results["methods"].values(), strict=True):
        assert "error" in row or row.count("|") == columns
        if "test_scores" in method.get("ours_equal", {}):  # the quality check is shown where it was measured
            scores = method["ours_equal"]["test_scores"]
            spread = " (" if "other_seeds" in method["ours_equal"] else " |"
            assert f"/ {scores['rougeL']:.2f}{spread}" in row


def test_a_method_whose_compiled_run_failed_keeps_its_row_and_says_so():
    results = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-h200.json").read_text())
    methods = results["methods"]
    methods["none"]["ours_compiled"] = {"tokens_per_s": 150000.0}
    methods["none"]["compile_speedup"] = 1.5
    methods["lora"]["ours_compiled"] = {"error": "BackendCompilerFailed: triton"}
    methods["p_tuning"]["ours_compiled"] = {"skipped": "its blocks cannot share one compiled graph"}
    rows = _speed_module().markdown_table(results).splitlines()
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert rows[2].endswith(f"| 150,000 (**{150000 / methods['none']['baseline']['tokens_per_s']:.2f}**, 1.5) |")
    assert rows[3].endswith("| failed: BackendCompilerFailed: triton |")
    assert rows[4].endswith("| – |")  # measured without --compile
    assert rows[5].endswith("| not run: its blocks cannot share one compiled graph |")


def test_the_quality_check_shows_how_far_other_seeds_moved_each_recipe():
    results = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-cpu-3-real-weights.json").read_text())
    base, ours = results["methods"]["lora"]["baseline"], results["methods"]["lora"]["ours_equal"]
    # seed 0: valid loss 4.4940 / 4.4984, ROUGE-L 9.50 / 9.52
    ours["other_seeds"] = [{"seed": 1, "valid_loss": 4.5102, "test_scores": {**ours["test_scores"], "rougeL": 8.7}},
                           {"seed": 2, "valid_loss": 4.4871, "test_scores": {**ours["test_scores"], "rougeL": 9.9}}]
    base["other_seeds"] = [{"seed": 1, "valid_loss": 4.4611, "test_scores": {**base["test_scores"], "rougeL": 10.25}},
                           {"seed": 2, "valid_loss": 4.5293, "test_scores": {"error": "RuntimeError: shapes"}}]
    lora_row, none_row = _speed_module().markdown_table(results).splitlines()[2:]
    # the recipe's seed whose generate failed still counts for the loss, not for the score
    assert ("| 4.494 (4.461–4.529, 3 seeds) / 4.498 (4.487–4.510, 3 seeds) "
            "| 9.50 (9.50–10.25, 2 seeds) / 9.52 (8.70–9.90, 3 seeds) |") in lora_row
    assert "seeds" not in none_row  # measured with one seed: nothing to show


def test_our_weights_decoded_the_recipes_way_get_a_column_of_their_own():
    results = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-cpu-3-real-weights.json").read_text())
    ours = results["methods"]["lora"]["ours_equal"]
    ours["test_scores_recipe_decoding"] = {**ours["test_scores"], "rougeL": 8.31}
    ours["other_seeds"] = [{"seed": 1, "valid_loss": 4.51, "test_scores": ours["test_scores"],
                            "test_scores_recipe_decoding": {**ours["test_scores"], "rougeL": 8.12}},
                           {"seed": 2, "valid_loss": 4.49, "test_scores": ours["test_scores"],
                            "test_scores_recipe_decoding": {"error": "RuntimeError: shapes"}}]
    lines = _speed_module().markdown_table(results).splitlines()
    assert "| test ROUGE-L base / ours@equal | test ROUGE-L ours@equal, the recipe's decoding |" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    lora_row, none_row = lines[2:]
    assert "/ 9.52 (9.52–9.52, 3 seeds) | 8.31 (8.12–8.31, 2 seeds) |" in lora_row  # a failed decoding: no score
    assert none_row.split(" | ")[8] == "–"  # measured before the column existed


def test_the_recipes_weights_decoded_with_our_generation_mends_get_a_column_of_their_own():
    speed = _speed_module()
    results = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-cpu-3-real-weights.json").read_text())
    base = results["methods"]["lora"]["baseline"]
    base[speed.MENDED_SCORES] = {**base["test_scores"], "rougeL": 7.1}
    base["other_seeds"] = [{"seed": 1, "valid_loss": 4.5, "test_scores": base["test_scores"],
                            speed.MENDED_SCORES: {**base["test_scores"], "rougeL": 8.4}}]
    lines = speed.markdown_table(results).splitlines()
    assert "| test ROUGE-L base / ours@equal | test ROUGE-L base, decoded with our generation mends |" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    lora_row, none_row = lines[2:]
    assert lora_row.split(" | ")[8] == "7.10 (7.10–8.40, 2 seeds)"
    assert none_row.split(" | ")[8] == "–"


QUALITY_ONLY = sorted((ROOT / "benchmarks" / "results" / "quality").glob("*.json"))


@pytest.mark.parametrize("path", QUALITY_ONLY, ids=[p.name for p in QUALITY_ONLY])
def test_every_committed_quality_run_renders_one_row_per_method_and_side(path):
    results = json.loads(path.read_text())
    table, _, differences = _speed_module().markdown_table(results).partition("\n\n")
    lines = table.splitlines()
    sides = [(f"| {name}", "the recipe" if side == "baseline" else "ours")
             for name, row in results["methods"].items() for side in row]
    assert [(line.split(" | ")[0], line.split(" | ")[1].split(" (")[0]) for line in lines[2:]] == sides
    assert all(line.count("|") == 9 for line in lines)
    # under the table, two lines (loss, ROUGE-L) for each method trained by both sides with two seeds or more
    both = [name for name, row in results["methods"].items()
            if all(row.get(side, {}).get("other_seeds") for side in ("baseline", "ours_equal"))]
    assert [line.split(",")[0] for line in differences.splitlines()] == [f"- {name}" for name in both for _ in "lr"]
    # seed by seed: per method a header, a rule, and two rows (loss, ROUGE-L) per side
    blocks = _speed_module().seed_table(results).split("\n\n")
    assert [len(block.splitlines()) for block in blocks] == [2 + 2 * len(row) for row in results["methods"].values()]


def _quality_run(speed, seed, loss, own, alike=None, **more):
    """One seed's quality check as the results files keep it (ours: ``alike`` is the recipe's decoding)."""
    run = {"seed": seed, "valid_loss": loss, "test_scores": {"rougeL": own, "mean_len": 2.0}, **more}
    if alike is not None:
        run[more.pop("alike_key", speed.MENDED_SCORES)] = {"rougeL": alike, "mean_len": 30.0}
    return run


def _quality_only_results(speed) -> dict:
    """A quality-only file: P-tuning, both sides with two seeds each (one of ours failed to decode); IA3, the
    recipe's seed 0 alone, failed to decode."""
    return {"only": "the quality check", "methods": {
        "p_tuning": {
            "baseline": {**_quality_run(speed, 0, 4.6164, 6.36, 8.1),
                         "other_seeds": [_quality_run(speed, 1, 4.5133, 7.42, 7.5)]},
            "ours_equal": {"seed": 3, "dtype": "bfloat16", "valid_loss": 4.7, "valid_loss_recipe_evaluation": 4.5,
                           "test_scores": {"rougeL": 5.0, "mean_len": 20.0},
                           "test_scores_recipe_decoding": {"rougeL": 6.0, "mean_len": 25.0},
                           "other_seeds": [{"seed": 5, "dtype": "bfloat16", "valid_loss": 4.8,
                                            "valid_loss_recipe_evaluation": 4.7,
                                            "test_scores": {"rougeL": 7.0, "mean_len": 30.0},
                                            "test_scores_recipe_decoding": {"error": "RuntimeError"}}]}},
        "ia3": {"baseline": {"valid_loss": 4.2, "test_scores": {"error": "RuntimeError"}}}}}


def test_a_quality_run_renders_each_side_as_the_mean_of_its_seeds_decoded_alike_and_its_own_way():
    speed = _speed_module()
    recipe, ours, ia3, blank, loss_difference = speed.markdown_table(_quality_only_results(speed)).splitlines()[2:]
    assert recipe == ("| p_tuning | the recipe | 0, 1 | 4.565 (4.513–4.616, 2 seeds) | 7.80 (7.50–8.10, 2 seeds) "
                      "| 30.0 (30.0–30.0, 2 seeds) | 6.89 (6.36–7.42, 2 seeds) | 2.0 (2.0–2.0, 2 seeds) |")
    # the loss as the recipe evaluates (fp32), and a failed decoding counts for no seed
    assert ours == ("| p_tuning | ours (bfloat16) | 3, 5 | 4.600 (4.500–4.700, 2 seeds) | 6.00 | 25.0 "
                    "| 6.00 (5.00–7.00, 2 seeds) | 25.0 (20.0–30.0, 2 seeds) |")
    # nothing of IA3's generation is mended: its one decoding is the alike one, and the first run is seed 0
    assert ia3 == "| ia3 | the recipe | 0 | 4.200 | – | – | – | – |"
    # under the table the difference of the means against both sides' seed-to-seed spread (Welch's standard
    # error); ROUGE-L has no line, since ours has one decoded seed only
    assert (blank, loss_difference) == ("", "- p_tuning, valid loss, fp32 evaluation: ours 4.600 ± 0.141 (2 seeds), "
                                            "the recipe 4.565 ± 0.073 (2 seeds), mean ± sd; ours − the recipe "
                                            "+0.035, standard error 0.113 (0.3 standard errors)")


def test_a_quality_run_renders_seed_by_seed_with_each_sides_mean_and_spread():
    speed = _speed_module()
    assert speed.seed_table(_quality_only_results(speed)).split("\n\n") == [
        "| p_tuning | 0 | 1 | 3 | 5 | mean ± sd |\n"
        "|---|---|---|---|---|---|\n"
        "| the recipe, valid loss | 4.616 | 4.513 | – | – | 4.565 ± 0.073 |\n"
        "| the recipe, ROUGE-L | 8.10 | 7.50 | – | – | 7.80 ± 0.42 |\n"
        "| ours (bfloat16), valid loss | – | – | 4.500 | 4.700 | 4.600 ± 0.141 |\n"
        "| ours (bfloat16), ROUGE-L | – | – | 6.00 | – | – |",
        "| ia3 | 0 | mean ± sd |\n"
        "|---|---|---|\n"
        "| the recipe, valid loss | 4.200 | – |\n"
        "| the recipe, ROUGE-L | – | – |"]


def test_quality_checks_of_several_runs_pool_seed_by_seed(tmp_path):
    speed = _speed_module()
    setup = {key: f"same {key}" for key in speed._SETUP} | {"date": "2026-12-07", "our_precision": "auto"}

    def part(methods, **more):
        return {**setup, "methods": methods, **more}
    recipe = {"baseline": {**_quality_run(speed, 0, 4.61, 6.4, 8.1),
                           "other_seeds": [_quality_run(speed, 1, 4.59, 6.6, 8.0)]}}
    timed = {"baseline": {"tokens_per_s": 141, "valid_loss": 4.6102, "test_scores": {"rougeL": 6.4, "mean_len": 2.0},
                          "other_seeds": [{"seed": 1, "valid_loss": 4.59, "test_scores": {"rougeL": 6.6}}]},
             "ours_equal": {"tokens_per_s": 372, "valid_loss": 4.65, "test_scores": {"rougeL": 3.4}}}
    later = {"baseline": {**_quality_run(speed, 3, 4.50, 7.0, 7.2)},
             "ours_equal": {"seed": 3, "valid_loss": 4.55, "test_scores": {"rougeL": 8.0},
                            "other_seeds": [{"seed": 4, "valid_loss": 4.52, "test_scores": {"rougeL": 7.0}}]}}
    pooled = speed.pool_seeds([part({"p_tuning": recipe}), part({"p_tuning": timed}),
                               part({"p_tuning": later}, date="2026-12-08", quality_prompts=100)],
                              ["a/q.json", "t.json", "later.json"])
    row = pooled["methods"]["p_tuning"]
    assert [r["seed"] for r in speed._seed_runs(row["baseline"])] == [0, 1, 3]
    assert [r["seed"] for r in speed._seed_runs(row["ours_equal"])] == [0, 3, 4]
    first = row["baseline"]
    # seed 0 was trained in two runs: the mended scores of one and the other's are joined, the speed is not kept
    assert first[speed.MENDED_SCORES]["rougeL"] == 8.1 and "tokens_per_s" not in first
    assert first["from"] == "q.json + t.json" and row["ours_equal"]["from"] == "t.json"
    assert pooled["date"] == "2026-12-08" and pooled["quality_prompts"] == 100 and "only" in pooled
    assert speed.markdown_table(pooled).splitlines()[2].startswith("| p_tuning | the recipe | 0, 1, 3 | 4.567 ")

    with pytest.raises(ValueError, match=r"t.json: p_tuning, baseline, seed 1: validation loss 4.7 against 4.59"):
        speed.pool_seeds([part({"p_tuning": recipe}), part({"p_tuning": {"baseline": {
            **_quality_run(speed, 1, 4.7, 6.6)}}})], ["q.json", "t.json"])
    with pytest.raises(ValueError, match="b.json: measured with another weights"):
        speed.pool_seeds([part({}), part({}, weights="other")], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="b.json: measured with another quality_prompts"):
        speed.pool_seeds([part({}, quality_prompts=32), part({}, quality_prompts=100)], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="b.json: ours at --precision fp32 --our-batches equal-tokens, but a.json at "
                                         "--precision auto --our-batches equal-tokens"):
        speed.pool_seeds([part({"p_tuning": timed}), part({"p_tuning": later}, our_precision="fp32")],
                         ["a.json", "b.json"])
    # another grouping of ours into steps is another training too; its table says which
    steps = speed.pool_seeds([part({"p_tuning": {"ours_equal": later["ours_equal"]}}, our_batches="recipe-steps")],
                             ["s.json"])
    assert "| ours (the recipe's steps) | 3, 4 |" in speed.markdown_table(steps)
    with pytest.raises(ValueError, match="b.json: ours at --precision auto --our-batches recipe-steps"):
        speed.pool_seeds([part({"p_tuning": timed}), part({"p_tuning": later}, our_batches="recipe-steps")],
                         ["a.json", "b.json"])
    # the recipe alone may come from a run whose own precision setting differs: it has no side of ours
    speed.pool_seeds([part({"p_tuning": timed}), part({"p_tuning": recipe}, our_precision="fp32")],
                     ["a.json", "b.json"])


class _FakeRecipe:
    """The recipe's interface as speed.py calls it; its replies say whether the model's generation was mended."""

    INSTR = {"dialogue": "Reply to the message:\n"}

    def __init__(self, peft_config):
        self.peft_config, self.seeds = peft_config, []
        self.TrainingArguments = lambda **kwargs: kwargs

    def peft_cfg(self, name):
        return self.peft_config

    def train(self, model, tok, data, bs, steps=None):
        self.seeds.append(self.TrainingArguments(warmup_steps=1, lr_scheduler_type="constant").get("seed", 0))
        return None, 0.0, None

    def generate(self, model, tok, task, rows):
        mended = getattr(model, "_peft_nlg_mask_positions", False)
        return [row["trg"] if mended else "no" for row in rows], 0.0


def test_a_soft_prompt_recipes_weights_are_scored_as_written_and_with_our_generation_mends(tiny_models,
                                                                                            monkeypatch):
    """peft's own generate (transformers 5, peft 0.21) numbers a left-padded row's positions over its padding and
    injects the soft prompt again at each step: the recipe's scores for P-tuning and prompt tuning are of that
    decoding, while our weights are decoded with the mends; the recipe's weights get both."""
    import torch
    from peft import LoraConfig, PromptEncoderConfig
    speed = _speed_module()
    monkeypatch.setattr(speed, "answer_loss", lambda *args: 4.25)
    rows = [{"src": "how are you", "trg": "fine thanks"}, {"src": "hello there", "trg": "hi how are you"}]
    p_tuning = _FakeRecipe(PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8))
    row = speed.recipe_quality_seeds(p_tuning, "p_tuning", [0, 1, 2], tiny_models["llama"], None, [], [], rows,
                                     torch.device("cpu"), 2, 3)
    assert p_tuning.seeds == [0, 1, 2]  # seed 0: as written (no seed of its own, the fake's 0)
    assert row["test_scores"]["rougeL"] == 0.0 and row[speed.MENDED_SCORES]["rougeL"] == 100.0
    assert [seed[speed.MENDED_SCORES]["rougeL"] for seed in row["other_seeds"]] == [100.0, 100.0]
    assert "tokens_per_s" not in row and row["valid_loss"] == 4.25
    lora = _FakeRecipe(LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    row = speed.recipe_quality_seeds(lora, "lora", [5], tiny_models["llama"], None, [], [], rows,
                                     torch.device("cpu"), 2, 3)
    assert speed.MENDED_SCORES not in row and "other_seeds" not in row  # nothing of LoRA's generation is mended
    assert lora.seeds == [5] and row["seed"] == 5  # a later run's first seed (--first-seed)


def test_our_side_of_the_quality_check_trains_once_per_seed_and_is_decoded_with_our_mends(tiny_models, tiny_data,
                                                                                          tmp_path):
    import torch
    from peft import PromptEncoderConfig

    from peft_nlg.data.io import read_pairs
    speed = _speed_module()
    recipe = _FakeRecipe(PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8))
    args = type("Args", (), {"valid_examples": 3, "precision": "fp32"})()
    common = speed._our_settings(recipe, "p_tuning", tiny_models["llama"], tiny_data, args)
    rows = read_pairs(tiny_data / "dialogue" / "valid.jsonl")
    side = speed.ours_equal_budget_seeds(recipe, "p_tuning", [2, 3], common, tiny_data, tmp_path, 64, 2, rows, rows,
                                         torch.device("cpu"), None)
    again = side["other_seeds"][0]
    assert (side["seed"], again["seed"], side["dtype"]) == (2, 3, "float32")
    assert "tokens_per_s" in side and "tokens_per_s" not in again  # the speed at equal tokens per step: once
    assert side["valid_loss"] != again["valid_loss"]  # another seed, another training
    # our weights are loaded as test mode loads them: the recipe's generate sees the mended model
    assert side["test_scores_recipe_decoding"]["rougeL"] == again["test_scores_recipe_decoding"]["rougeL"] == 100.0
    # in the recipe's steps: its batch size (2 here) a step, so as many optimizer steps as it takes
    side = speed.ours_equal_budget_seeds(recipe, "p_tuning", [0], common, tiny_data, tmp_path / "steps", 64, 2, rows,
                                         rows, torch.device("cpu"), None, "recipe-steps")
    assert side["steps"] == math.ceil(len(read_pairs(tiny_data / "dialogue" / "train.jsonl")) / 2)


def test_generation_alone_times_ours_and_the_recipes_where_it_times_one(tiny_models, tiny_data, tmp_path):
    """--generation-only: our greedy and beam generation, the recipe's greedy generate only for the methods whose
    generation it times, and the ratio from the medians; the table has one row per method."""
    import torch
    from peft import LoraConfig, PromptEncoderConfig

    from peft_nlg.data.io import read_pairs
    speed = _speed_module()
    args = type("Args", (), {"valid_examples": 3, "precision": "fp32", "merge_adapter": "auto", "gen_repeats": 3,
                             "greedy_loop": "auto", "also_greedy_loop": None, "also_decode_attention": None,
                             "cudnn_attention_too": False, "beam_prompts": 2})()
    rows = read_pairs(tiny_data / "dialogue" / "test.jsonl")
    results = {"only": speed.GENERATION_ONLY, "methods": {}}
    for name, peft_config in (("lora", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])),
                              ("p_tuning", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                               encoder_hidden_size=8))):
        recipe = _FakeRecipe(peft_config)
        rates = iter([40.0, 10.0, 20.0])
        recipe.generate = lambda model, tok, task, rows, rates=rates: ([r["trg"] for r in rows], next(rates, 5.0))
        common = speed._our_settings(recipe, name, tiny_models["llama"], tiny_data, args)
        row, recipe_generation = speed.bench_generation(name, recipe, args, common, tiny_models["llama"], None, rows,
                                                        tmp_path, torch.device("cpu"), len(rows), len(rows))
        greedy = row["ours_gen_greedy"]
        assert greedy["new_tokens"] > 0 and len(greedy["repeat_rates"]) == 3
        assert greedy["new_tokens_per_s"] == sorted(greedy["repeat_rates"])[1]  # the median of three rounds
        assert row["ours_gen_beam"]["new_tokens"] > 0
        results["methods"][name] = speed.generation_only_row(row, recipe_generation)
    lora, p_tuning = results["methods"]["lora"], results["methods"]["p_tuning"]
    # the warm-up's rate (the first) is not counted; of the recipe's three rounds the median is 10
    assert lora["baseline"] == {"gen_tokens_per_s": 10.0, "repeat_rates": [5.0, 10.0, 20.0]}
    assert lora["gen_speedup_greedy"] == round(lora["ours_gen_greedy"]["new_tokens_per_s"] / 10.0, 2)
    assert p_tuning["baseline"] == {} and "gen_speedup_greedy" not in p_tuning
    header, rule, lora_line, p_tuning_line = speed.markdown_table(results).splitlines()
    assert lora_line.startswith("| lora | 10 | ") and f"**{lora['gen_speedup_greedy']}**" in lora_line
    assert p_tuning_line.startswith("| p_tuning | – | ") and "| **–** |" in p_tuning_line
    # two generation-only runs of one setup merge into one generation table, never with a timed run's file
    setup = {key: None for key in speed._SETUP}
    parts = [{**setup, **results, "date": "2026-12-08", "methods": {name: row}} for name, row in
             results["methods"].items()]
    merged = speed.merge_results(parts, ["a.json", "b.json"])
    assert speed.markdown_table(merged) == speed.markdown_table(results)
    with pytest.raises(ValueError, match="b.json: measured with another only"):
        speed.merge_results([parts[0], {**parts[1], "only": None}], ["a.json", "b.json"])


GENERATION_ONLY = sorted((ROOT / "benchmarks" / "results" / "generation").glob("*.json"))


@pytest.mark.parametrize("path", GENERATION_ONLY, ids=[p.name for p in GENERATION_ONLY])
def test_every_committed_generation_run_renders_one_row_per_method(path):
    speed = _speed_module()
    results = json.loads(path.read_text())
    lines = speed.markdown_table(results).splitlines()
    assert results["only"] == speed.GENERATION_ONLY and len(lines) == 2 + len(results["methods"])
    for line, (name, row) in zip(lines[2:], results["methods"].items(), strict=True):
        assert line.startswith(f"| {name} | ") and f"{row['ours_gen_greedy']['new_tokens_per_s']:,.0f}" in line


def test_results_of_one_setup_from_two_calls_merge_into_one_table(tmp_path):
    speed = _speed_module()
    whole = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-h200.json").read_text())
    first, second = (dict(whole, methods={m: whole["methods"][m] for m in names})
                     for names in (["none", "lora"], ["prefix_tuning", "p_tuning", "prompt_tuning"]))
    merged = speed.merge_results([first, second], ["a.json", "b.json"])
    assert merged["methods"] == whole["methods"]
    assert merged["merged_from"]["lora"] == "a.json (2026-11-26)" and merged["merged_from"]["p_tuning"].startswith("b")
    assert speed.markdown_table(merged) == speed.markdown_table(whole)

    with pytest.raises(ValueError, match="b.json: lora, none measured in two"):
        speed.merge_results([first, dict(second, methods=first["methods"])], ["a.json", "b.json"])
    other_card = dict(second, device={**second["device"], "gpu": "NVIDIA H100"})
    with pytest.raises(ValueError, match="b.json: measured with another device"):
        speed.merge_results([first, other_card], ["a.json", "b.json"])


def test_a_generation_timing_reports_the_median_run_and_every_rate():
    speed = _speed_module()
    runs = [{"new_tokens_per_s": rate, "generate_seconds": seconds}
            for rate, seconds in ((310.0, 21.0), (280.5, 23.2), (402.0, 16.1))]
    assert speed._median_run(runs) == {"new_tokens_per_s": 310.0, "generate_seconds": 21.0,
                                       "repeat_rates": [280.5, 310.0, 402.0]}
    assert speed._median_run(runs[:1]) == runs[0]  # one timing: no spread to show


def test_saved_activations_count_what_the_backward_pass_keeps():
    """A frozen linear layer keeps no input for its backward pass, a trained one keeps it, and computes one
    product more (its weight's gradient): the measures behind the comparison of methods
    (benchmarks/activation_memory.py)."""
    import torch

    module = _benchmark_module("activation_memory")
    layer = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(32, 64, requires_grad=True)  # an activation coming from earlier layers

    def keeps(requires_grad: bool) -> dict:
        x.grad = layer.weight.grad = None  # no gradient to add to from an earlier call
        layer.weight.requires_grad_(requires_grad)
        return module.saved_for_backward(layer, lambda: layer(x))

    trained, frozen = keeps(True), keeps(False)
    assert {k: trained[k] for k in ("parameters", "activations")} == {"parameters": 64 * 64 * 4,
                                                                      "activations": 32 * 64 * 4}
    assert {k: frozen[k] for k in ("parameters", "activations")} == {"parameters": 64 * 64 * 4, "activations": 0}
    assert trained["ops"] == frozen["ops"] + 1 and frozen["ops"] >= 3  # forward, sum, input's gradient
    assert module.parse_variant("lora:lora_dropout=0.05;r=8") == ("lora", {"lora_dropout": 0.05, "r": 8})


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results" / "activations").glob("*.json")),
                         ids=lambda p: p.name)
def test_committed_activation_counts_render_one_row_each(path):
    module = _benchmark_module("activation_memory")
    results = json.loads(path.read_text())
    rows = module.markdown_table(results).splitlines()[2:]
    assert len(rows) == len(results["rows"]) > 0
    assert all(f"| {r['method']} |" in row for r, row in zip(results["rows"], rows, strict=True))


def test_the_runs_set_beside_the_recipes_quality_train_on_its_examples_only(tmp_path):
    from peft_nlg.data.io import read_pairs
    split = [{"src": f"message {i}", "trg": f"reply {i}"} for i in range(30)]
    recipe_rows = split[:8]
    speed_data, recipe_data = _speed_module().write_bench_data(tmp_path, split, recipe_rows, split[8:10], split[10:12])
    assert read_pairs(recipe_data / "dialogue" / "train.jsonl") == recipe_rows
    assert read_pairs(speed_data / "dialogue" / "train.jsonl") == split
    for data in (speed_data, recipe_data):
        assert read_pairs(data / "dialogue" / "valid.jsonl") == split[8:10]
        assert read_pairs(data / "dialogue" / "test.jsonl") == split[10:12]


def test_our_loss_evaluated_as_the_recipe_evaluates_its_own_stands_beside_it():
    results = json.loads((ROOT / "benchmarks" / "results" / "2026-11-26-cpu-3-real-weights.json").read_text())
    ours = results["methods"]["lora"]["ours_equal"]
    ours["valid_loss_recipe_evaluation"] = 4.5871
    ours["other_seeds"] = [{"seed": 1, "valid_loss": 4.61, "valid_loss_recipe_evaluation": 4.6094,
                            "test_scores": ours["test_scores"]}]
    lines = _speed_module().markdown_table(results).splitlines()
    lora_row, none_row = lines[2:]
    assert "; ours evaluated as the recipe evaluates its own: 4.587 (4.587–4.609, 2 seeds) |" in lora_row
    assert "evaluated" not in none_row


def test_the_equal_budget_runs_take_the_recipes_schedule_from_its_own_code(tmp_path):
    def recipe(body: str):
        path = tmp_path / f"recipe_{len(list(tmp_path.iterdir()))}.py"
        path.write_text(f"def train(model, tok, data, bs, steps=None, epochs=1, lr=2e-4):\n    {body}\n")
        return _load_module(path)

    speed = _speed_module()
    written = recipe('return dict(learning_rate=lr, warmup_steps=5, lr_scheduler_type="cosine")')
    assert speed._recipe_schedule(written) == {"warmup_steps": 5, "lr_schedule": "cosine"}
    other = recipe("return dict(warmup_steps = 12, lr_scheduler_type='linear')")
    assert speed._recipe_schedule(other) == {"warmup_steps": 12, "lr_schedule": "linear"}
    with pytest.raises(ValueError, match="warmup_steps= and lr_scheduler_type="):
        speed._recipe_schedule(recipe("return dict(warmup_ratio=0.1)"))


def test_a_profiled_run_leaves_its_op_table_beside_the_results(tiny_models, tiny_data, tmp_path):
    from types import SimpleNamespace

    from peft_nlg.config import build_config
    run = build_config({"task": "dialogue", "method": "lora", "model": str(tiny_models["llama"]),
                        "data_dir": str(tiny_data), "output_dir": str(tmp_path / "timed"), "report_to": "none",
                        "overwrite": True, "max_steps": 3, "eval_every": 10**9, "max_valid_examples": 2})
    args = SimpleNamespace(profile_steps=2, out=str(tmp_path / "bench.json"))
    first_line = _speed_module()._profile(run, tmp_path / "profiled", args, "lora", "eager")
    table = (tmp_path / "bench-lora-eager-profile.txt").read_text()
    assert first_line.startswith("2 steps in ") and table.splitlines()[0] == first_line
    assert "aten::mm" in table or "aten::addmm" in table  # the op table itself, not only the summary
    assert not (tmp_path / "timed").exists()  # the timed run's directory is not touched


def test_the_generation_profile_splits_prefill_from_decoding_and_keeps_earlier_output(tiny_models, tiny_data,
                                                                                       tmp_path):
    profiler = _benchmark_module("profile_generation")
    out = tmp_path / "profile.json"
    argv = ["--task", "dialogue", "--model", str(tiny_models["llama"]), "--data-dir", str(tiny_data),
            "--prompts", "2", "--max-new-tokens", "6", "--out", str(out)]
    assert profiler.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["prompts"] == 2 and summary["generation"]["new_tokens"] > 0
    assert summary["whole_s"] > 0 and summary["prefill_s"] > 0 and summary["profiled_s"] > 0
    assert summary["generation"]["decoding_loop"] == "peft-nlg greedy"  # test mode's CPU loop, not another
    assert summary["top_ops_self_cpu_ms"] and all(ms >= 0 for ms in summary["top_ops_self_cpu_ms"].values())
    tables = (tmp_path / "profile.txt").read_text()
    assert "## by op and input shapes" in tables and "linear" in tables
    before = out.read_text()
    assert profiler.main(argv) == 2 and out.read_text() == before  # never overwritten


def test_decode_attention_benchmark_times_every_way_and_checks_each_against_fp32(tmp_path, capsys):
    from peft_nlg import cpu_kernels

    bench = _benchmark_module("decode_attention")
    out = tmp_path / "attention.json"
    argv = ["--rows", "1", "5", "--positions", "40", "--layers", "2", "--repeats", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads(out.read_text())
    expected_ways = ["products", "sdpa"] if cpu_kernels.decode_attention_unavailable() else \
        ["kernel", "products", "sdpa"]
    assert [row["rows"] for row in summary["results"]] == [1, 5]
    for row in summary["results"]:
        assert list(row["ways"]) == expected_ways
        for way in row["ways"].values():
            assert 0 < way["ms_per_layer_best"] <= way["ms_per_layer_median"]
            assert way["max_abs_diff_from_fp32"] < 0.05  # bf16 attention, not something else
    assert "| 5 |" in capsys.readouterr().out
    assert bench.main(argv) == 2  # never overwrites
