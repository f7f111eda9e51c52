"""The study grid on a tiny model: resumable, fair learning-rate search, reproducible records, and a report
whose README table can be checked against them."""

import json
import shutil
from pathlib import Path

import pytest

from peft_nlg import cli
from peft_nlg.config import build_config
from peft_nlg.evaluation import test as run_test
from peft_nlg.grid import GridSpec, plan, run_grid, stable_view
from peft_nlg.report import END, START, load_records, load_searches, main_table, mixed_data, report
from peft_nlg.tasks import TASKS
from peft_nlg.training import data_fingerprints, train

REPO = Path(__file__).resolve().parents[1]


def _spec(tiny_models, tiny_data):
    return GridSpec(tasks=["translation"], methods=["lora", "ia3"], lr_factors=[0.5, 2.0], ladder=[2],
                    token_budget=400, overrides={"model": str(tiny_models["llama"]), "data_dir": str(tiny_data),
                                                 "report_to": "none", "max_new_tokens": 4, "patience": 100})


def test_grid_is_reproducible_resumable_and_reported(tiny_models, tiny_data, tmp_path):
    spec = _spec(tiny_models, tiny_data)
    first = run_grid(spec, tmp_path / "rec1", tmp_path / "work1", log=lambda *_: None)
    # 1 zero-shot + 2 methods x (full split + one ladder size)
    assert len(first) == 5
    search = json.loads((tmp_path / "rec1" / "translation" / "lora" / "lr_search.json").read_text())
    assert len(search["valid_loss_by_lr"]) == 2
    assert search["valid_loss_by_lr"][f"{search['selected_lr']:g}"] == min(search["valid_loss_by_lr"].values())
    for record in first[1:]:
        assert record["train"]["train_tokens"] >= 400  # every method got the same budget
        assert record["train"]["train_tokens"] < 400 + 2 * 600
        assert record["command"] and record["train"]["command"]  # what it takes to run it again
    for path in (tmp_path / "rec1").rglob("record-train.json"):  # a search's runs carry their settings too
        assert path.parent.name.startswith(f"lr{json.loads(path.read_text())['config']['learning_rate']:g}-n")
    # every method saw the same data; a ladder rung saw a subset
    fingerprints = {(r["method"], r["grid"]["train_examples"]): r["train"]["data_fingerprints"]["train"]
                    for r in first[1:]}
    assert fingerprints[("lora", None)] == fingerprints[("ia3", None)] != fingerprints[("lora", 2)]
    assert fingerprints[("lora", 2)] == fingerprints[("ia3", 2)]

    # same configuration and seed on the same machine: the same records, times aside, whether runs train one
    # after another or two at once in worker processes (which say so in their records, and log to files)
    spec.parallel = 2
    second = run_grid(spec, tmp_path / "rec2", tmp_path / "work2", log=lambda *_: None)
    spec.parallel = 1
    assert [stable_view(r) for r in first] == [stable_view(r) for r in second]
    assert {r["train"].get("concurrent_runs") for r in first[1:]} == {None}
    assert {r["train"]["concurrent_runs"] for r in second[1:]} == {2}
    # a finished model's test runs in the main process while the next search trains (zero-shot beside LoRA's
    # search, LoRA's test beside IA3's; IA3's test has nothing beside it), and ladder rungs are tested in the
    # workers: each test's generation speed says how many processes shared the device
    assert [r["grid"].get("concurrent_runs") for r in second] == [3, 3, None, 2, 2]
    assert [r["grid"].get("concurrent_runs") for r in first] == [None] * 5
    logs = {p.parent.relative_to(tmp_path / "work2").as_posix(): p.read_text() for p in
            (tmp_path / "work2").rglob("train.log")}
    assert len(logs) == 6  # 2 methods x (2 learning rates + 1 ladder rung)
    assert all(f"train translation/{name.split('/')[1]}" in text for name, text in logs.items())
    # the report says which times were measured on a shared device
    shared_readme = tmp_path / "README-shared.md"
    shared_readme.write_text(f"{START}\n{END}\n")
    assert report(tmp_path / "rec2", readme=shared_readme) == 0
    shared_md = (tmp_path / "rec2" / "RESULTS.md").read_text()
    assert "2 runs trained at once on one device" in shared_md and " (2 at once) |" in shared_md

    # a finished grid is not run again: records are reused as they are
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "rec1").rglob("*.json")}
    run_grid(spec, tmp_path / "rec1", tmp_path / "work1", log=lambda *_: None)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "rec1").rglob("*.json")}
    # nor for a setting that changes how, not what, a run computes: batches split into passes for memory
    spec.overrides = {**spec.overrides, "max_forward_tokens": 64}
    run_grid(spec, tmp_path / "rec1", tmp_path / "work1", log=lambda *_: None)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "rec1").rglob("*.json")}
    spec.overrides = {k: v for k, v in spec.overrides.items() if k != "max_forward_tokens"}

    # records made with other training settings are not mixed into this grid's results: refused, by name
    spec.overrides = {**spec.overrides, "warmup_ratio": 0.2}
    with pytest.raises(ValueError, match=r"lr[^/]*-nall/record-train\.json: made with warmup_ratio=0\.05 \(now 0\.2\)"):
        run_grid(spec, tmp_path / "rec1", tmp_path / "work1", log=lambda *_: None)
    spec.overrides = {k: v for k, v in spec.overrides.items() if k != "warmup_ratio"}

    # a work dir left by a grid with other settings is not taken for this grid's run
    spec.overrides = {**spec.overrides, "seed": 1}
    run_grid(spec, tmp_path / "rec3", tmp_path / "work1", log=lambda *_: None)
    spec.overrides = {k: v for k, v in spec.overrides.items() if k != "seed"}
    assert {json.loads(p.read_text())["seed"] for p in (tmp_path / "rec3").rglob("record-train.json")} == {1}

    # the report: the README table comes from the records, and --check notices a hand edit
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nrest\n")
    assert report(tmp_path / "rec1", check=True, readme=readme) == 1
    assert report(tmp_path / "rec1", readme=readme) == 0
    assert report(tmp_path / "rec1", check=True, readme=readme) == 0
    table = main_table(load_records(tmp_path / "rec1"))
    assert "| LoRA |" in table and "| Zero-shot (no training) |" in table and "| IA3 |" in table
    assert "Quality targets (" in table and "without a record yet" in table
    # the README names the detailed results where they are, relative to itself
    assert "Details: `rec1/RESULTS.md`" in readme.read_text()
    results_md = (tmp_path / "rec1" / "RESULTS.md").read_text()
    # the search is published, the selected rate in bold, and the targets are checked run by run
    assert f"**{search['selected_lr']:g}: " in results_md and "## Learning-rate search" in results_md
    assert "| translation | prefix_tuning | – | no record |" in results_md
    for plot in ("quality_vs_cost.png", "peak_memory.png", "learning_curves.png"):
        assert (tmp_path / "rec1" / plot).stat().st_size > 10_000
    readme.write_text(readme.read_text().replace("| LoRA |", "| LoRA (edited) |"))
    assert report(tmp_path / "rec1", check=True, readme=readme) == 1


def test_grid_command_line_and_decoding_search(tiny_models, tiny_data, tmp_path):
    assert cli.main(["grid", "--tasks", "dialogue", "--methods", "prompt_tuning", "--lr-factors", "1",
                     "--ladder", "2", "--token-budget", "200", "--no-zero-shot", "--records", str(tmp_path / "rec"),
                     "--work-dir", str(tmp_path / "work"), "--set",
                     f"model={tiny_models['t5']},data_dir={tiny_data},report_to=none,max_new_tokens=3"]) == 0
    records = load_records(tmp_path / "rec")
    assert [(r["task"], r["method"], r["grid"]["train_examples"]) for r in records] == [
        ("dialogue", "prompt_tuning", 2), ("dialogue", "prompt_tuning", None)]
    rung, selected = records
    # the table's run chose its decoding on validation (the dialogue task declares a search) ...
    searched = selected["decoding_search"]
    assert len(searched["candidates"]) == len(TASKS["dialogue"].decoding_search.candidates)
    assert selected["_path"].endswith(f"record-test-{searched['chosen']['search']}.json")
    # ... and the data-size ladder reused that choice instead of searching again
    assert rung["decoding_search"] is None
    assert {k: rung["decoding"][k] for k in ("search", "temperature", "top_p", "no_repeat_ngram")} == {
        k: selected["decoding"][k] for k in ("search", "temperature", "top_p", "no_repeat_ngram")}
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert report(tmp_path / "rec", readme=readme) == 0
    results_md = (tmp_path / "rec" / "RESULTS.md").read_text()
    assert "## Decoding search" in results_md and f"**{searched['chosen_name']}: rougeL " in results_md
    # the original's shape: every method's row, empty cells where no run exists yet
    assert "| LoRA | – | – | – |" in readme.read_text() and "| IA3 | – | – | – |" in readme.read_text()


def test_grid_method_options_reach_every_run_of_the_one_method(tiny_models, tiny_data, tmp_path, capsys):
    common = ["grid", "--tasks", "translation", "--lr-factors", "1", "--lr-extensions", "0", "--ladder", "2",
              "--token-budget", "200", "--no-zero-shot", "--set",
              f"model={tiny_models['llama']},data_dir={tiny_data},report_to=none,max_new_tokens=3"]
    # options are per method: with two methods the command refuses rather than guess
    assert cli.main([*common, "--methods", "lora,ia3", "--method-options", "r=4", "--records",
                     str(tmp_path / "refused"), "--work-dir", str(tmp_path / "w0")]) == 2
    assert "exactly one method" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert cli.main([*common, "--methods", "lora", "--method-options", "r=4,lora_alpha=8", "--records",
                     str(tmp_path / "rec"), "--work-dir", str(tmp_path / "work")]) == 0
    records = load_records(tmp_path / "rec")
    assert len(records) == 2  # the selected run and the ladder's rung
    assert build_config({"method": "lora"}).method_options["r"] == 16  # the options replaced the default
    for record in records:
        assert record["config"]["method_options"]["r"] == 4 and record["config"]["method_options"]["lora_alpha"] == 8
    # rank 4 trains a quarter of rank 16's adapter parameters
    rank16 = cli.main([*common, "--methods", "lora", "--ladder", "", "--records", str(tmp_path / "rec16"),
                       "--work-dir", str(tmp_path / "work16")])
    assert rank16 == 0
    (full16,) = load_records(tmp_path / "rec16")
    selected = next(r for r in records if r["grid"]["train_examples"] is None)
    assert selected["trainable_params"] * 4 == full16["trainable_params"]
    # records made with other options are not taken for the default configuration's
    assert cli.main([*common, "--methods", "lora", "--ladder", "", "--records", str(tmp_path / "rec"),
                     "--work-dir", str(tmp_path / "work")]) == 2
    assert "move it away to run it again" in capsys.readouterr().err


def test_grid_survives_time_limits_and_lost_work_dirs(tiny_models, tiny_data, tmp_path):
    """GPU slots end and take their disks along: a grid stopped by its time limit, or resumed on a machine
    without the work dir, finishes with the records an uninterrupted grid gives."""
    spec = _spec(tiny_models, tiny_data)
    records, quiet = tmp_path / "rec", (lambda *_: None)
    spec.time_limit_s = 1e-6  # room for the first run only
    assert len(run_grid(spec, records, tmp_path / "work-a", log=quiet)) == 1
    assert [name for name, finished in plan(spec, records) if finished] == ["translation/zero_shot test"]

    spec.time_limit_s = 0
    finished = run_grid(spec, records, tmp_path / "work-b", log=quiet)
    assert all(finished_ for _, finished_ in plan(spec, records))
    uninterrupted = run_grid(_spec(tiny_models, tiny_data), tmp_path / "rec-ref", tmp_path / "work-ref", log=quiet)
    assert [stable_view(r) for r in finished] == [stable_view(r) for r in uninterrupted]

    # a new machine: the learning-rate search is read from its records, the selected model is trained again
    search_records = {p: p.stat().st_mtime_ns for p in records.rglob("record-train.json")}
    selected = next(records.joinpath("translation", "lora").glob("lr*-nall/record-test-*.json"))
    original = json.loads(selected.read_text())
    selected.unlink()
    again = run_grid(spec, records, tmp_path / "work-c", log=quiet)
    assert stable_view(json.loads(selected.read_text())) == stable_view(original)
    assert search_records == {p: p.stat().st_mtime_ns for p in records.rglob("record-train.json")}
    trained = [p.relative_to(tmp_path / "work-c") for p in (tmp_path / "work-c").glob("*/*/*")]
    assert [str(p) for p in trained] == [f"translation/lora/{selected.parent.name}"]  # nothing else ran
    assert len(again) == len(finished)


def test_search_goes_beyond_an_edge_winner():
    from peft_nlg.grid import beyond_edge
    assert beyond_edge({1e-4: 2.0, 2e-4: 1.9, 4e-4: 1.8}) == 8e-4       # the largest won: one step up
    assert beyond_edge({1e-4: 1.7, 2e-4: 1.9, 4e-4: 1.8}) == 5e-5       # the smallest won: one step down
    assert beyond_edge({5e-4: 2.0, 1e-3: 1.7, 2e-3: 1.8}) is None       # worse on both sides: done
    assert beyond_edge({1e-3: 1.0}) is None


def test_grid_extends_the_search_past_an_edge_winner(tiny_models, tiny_data, tmp_path):
    """With two rates the winner is always at an edge, so one more rate is tried beyond it, and the selected
    run is the best of all three on validation."""
    spec = _spec(tiny_models, tiny_data)
    spec.methods, spec.ladder, spec.zero_shot, spec.lr_extensions = ["lora"], [], False, 1
    logged = []
    [record] = run_grid(spec, tmp_path / "rec", tmp_path / "work", log=logged.append)
    search = json.loads((tmp_path / "rec" / "translation" / "lora" / "lr_search.json").read_text())
    first = spec.learning_rates("translation", "lora")
    [beyond] = search["extended"]
    assert beyond in (first[0] / 4, first[1] * 4)  # factors 0.5 and 2: one step of x4 outward
    assert [float(lr) for lr in search["valid_loss_by_lr"]] == sorted([*first, beyond])
    best = min(search["valid_loss_by_lr"], key=search["valid_loss_by_lr"].get)
    assert record["grid"]["learning_rate"] == search["selected_lr"] == float(best)
    assert any("is the edge of those tried" in line for line in logged)
    assert [name for name, finished in plan(spec, tmp_path / "rec") if not finished] == []
    assert len([name for name, _ in plan(spec, tmp_path / "rec") if name.endswith(" train")]) == 3
    # cut off before the extra rate trained: the plan already knows it is due
    beyond_run = next((tmp_path / "rec" / "translation" / "lora").glob(f"lr{beyond:g}-nall"))
    (beyond_run / "record-train.json").unlink()
    # the test recorded earlier may not be the one the finished search selects: due again
    due = [name for name, finished in plan(spec, tmp_path / "rec") if not finished]
    assert due == [f"translation/lora lr{beyond:g}-nall train", "translation/lora selected lr test"]
    (tmp_path / "rec" / "translation" / "lora" / "lr_search.json").unlink()
    assert f"translation/lora lr{beyond:g}-nall train" in [
        name for name, finished in plan(spec, tmp_path / "rec") if not finished]


def test_learning_rate_factors_may_differ_by_task():
    from peft_nlg.grid import beyond_edge
    spec = GridSpec(tasks=["translation", "dialogue"], methods=["lora"],
                    lr_factors={"translation": [0.5, 1, 2], "dialogue": [1, 4, 16]})
    default = build_config({"task": "dialogue", "method": "lora"}).learning_rate
    assert spec.learning_rates("translation", "lora") == [float(f"{default * f:.3g}") for f in (0.5, 1, 2)]
    dialogue = spec.learning_rates("dialogue", "lora")
    assert dialogue == [float(f"{default * f:.3g}") for f in (1, 4, 16)]
    # past the edge, the search steps on by its own spacing
    assert beyond_edge(dict(zip(dialogue, (3.0, 2.9, 2.8), strict=True))) == float(f"{default * 64:.3g}")
    with pytest.raises(ValueError, match="no entry for task 'summarization'"):
        spec.learning_rates("summarization", "lora")


def test_study_defaults_cover_every_task_and_are_valid_settings():
    from peft_nlg.config import build_config
    from peft_nlg.grid import study_defaults
    from peft_nlg.tasks import TASKS
    study = study_defaults()
    assert set(study["token_budget"]) == set(TASKS) and all(v > 0 for v in study["token_budget"].values())
    assert set(study["lr_factors"]) == set(TASKS)
    assert all(1.0 in factors and len(factors) >= 2 for factors in study["lr_factors"].values())  # the default too
    for task in TASKS:
        build_config({**study["set"], "task": task})  # raises on an unknown setting
    # the study's tests decode adapters as loaded throughout, as its first records did (not folded in bf16)
    assert study["set"]["merge_adapter"] == "no"


def test_parallel_training_failure_names_the_run_and_its_log(tiny_data, tmp_path):
    """A run that fails in a worker process fails the grid with its work dir and log, after the others end."""
    from peft_nlg.grid import _train_once, _Workers

    workers = _Workers(2)
    jobs = [({"task": "translation", "method": "lora", "model": str(tmp_path / "no-such-model"),
              "data_dir": str(tiny_data), "report_to": "none"}, tmp_path / f"run{i}", tmp_path / f"rec{i}.json")
            for i in range(2)]
    try:
        with pytest.raises(RuntimeError, match=r"training failed: .*run0: .*no-such-model.*run0/train\.log\)"):
            workers.map(_train_once, [(*job, False) for job in jobs])
    finally:
        workers.close()
    assert "no-such-model" in (tmp_path / "run1" / "train.log").read_text()
    assert not (tmp_path / "rec0.json").exists()


def fails_in_a_worker(overrides, work, value, shared_by=1):
    """A job that fails only beside others, in a worker process (as when the shared GPU runs out of memory)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        raise MemoryError("out of memory beside the other runs")
    return {"value": value, "shared_by": shared_by}


def test_a_run_that_fails_beside_others_is_retried_alone(tmp_path):
    from peft_nlg.grid import _Workers

    workers = _Workers(2)
    try:
        results = workers.map(fails_in_a_worker, [({}, tmp_path / f"run{i}", i) for i in range(2)])
    finally:
        workers.close()
    assert results == [{"value": 0, "shared_by": 1}, {"value": 1, "shared_by": 1}]
    assert "MemoryError: out of memory beside the other runs" in (tmp_path / "run0" / "train.log").read_text()


def dies_in_a_worker(overrides, work, value, shared_by=1):
    """A job whose worker process is killed outright (as the kernel's OOM killer does when host memory runs out)."""
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:
        os._exit(137)
    return {"value": value, "shared_by": shared_by}


def test_a_killed_worker_does_not_break_later_groups(tmp_path):
    """A killed worker breaks its process pool: its group is retried alone, and the next group gets new workers."""
    from peft_nlg.grid import _Workers

    workers = _Workers(2)
    try:
        first = workers.map(dies_in_a_worker, [({}, tmp_path / f"run{i}", i) for i in range(2)])
        second = workers.map(fails_in_a_worker, [({}, tmp_path / f"again{i}", i) for i in range(2, 4)])
    finally:
        workers.close()
    assert first == [{"value": 0, "shared_by": 1}, {"value": 1, "shared_by": 1}]
    # the second group did reach (new) workers: they raised there, and the jobs were retried alone
    assert second == [{"value": 2, "shared_by": 1}, {"value": 3, "shared_by": 1}]
    assert "MemoryError" in (tmp_path / "again2" / "train.log").read_text()


def test_a_test_whose_rate_the_search_later_replaced_leaves_the_table(tmp_path):
    """A search resumed with more rates past its edge may select a new rate: the table shows that rate's test,
    whatever the order of the folders, and the earlier test stays, marked, in RESULTS.md."""
    committed = json.loads(next(iter(sorted((REPO / "results" / "translation" / "none").glob(
        "lr*/record-test-*.json")))).read_text())
    method_dir = tmp_path / "rec" / "translation" / "none"
    for rate, bleu in ((0.0005, 11.0), (0.00025, 22.0)):  # "lr0.00025" sorts before "lr0.0005"
        record = {**committed, "scores": {**committed["scores"], "bleu": bleu},
                  "grid": {**committed["grid"], "learning_rate": rate, "selected": True}}
        (method_dir / f"lr{rate:g}-nall").mkdir(parents=True)
        (method_dir / f"lr{rate:g}-nall" / "record-test-beam.json").write_text(json.dumps(record))
    search = {"task": "translation", "method": "none", "selected_lr": 0.00025,
              "valid_loss_by_lr": {"0.00025": 2.0, "0.0005": 2.1, "0.001": 2.2}, "extended": [0.00025]}
    (method_dir / "lr_search.json").write_text(json.dumps(search))
    records = load_records(tmp_path / "rec")
    assert [r["_superseded"] for r in records] == [False, True]
    assert "| Full fine-tuning | 22.00 (chrf" in main_table(records)
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert report(tmp_path / "rec", readme=readme) == 0
    assert "| translation | none (superseded) | all |" in (tmp_path / "rec" / "RESULTS.md").read_text()
    search["selected_lr"] = 0.0005  # the other way round: the other record is the table's
    (method_dir / "lr_search.json").write_text(json.dumps(search))
    assert "| Full fine-tuning | 11.00 (chrf" in main_table(load_records(tmp_path / "rec"))


def test_gpu_times_measured_with_cudnn_attention_are_marked(tmp_path):
    """Records from before attention left out cuDNN (the committed H200 translation runs say nothing about it)
    and records that allowed it are marked, in RESULTS.md and the time plot; later GPU runs are not."""
    committed = json.loads(next(iter(sorted((REPO / "results" / "translation" / "none").glob(
        "lr*/record-test-*.json")))).read_text())
    assert committed["hardware"]["gpu"] and "attention_kernels" not in committed["train"]
    newer = {**committed, "method": "lora",
             "train": {**committed["train"], "attention_kernels": "flash, efficient, math (no cuDNN)"},
             "generation": {**committed["generation"], "attention_kernels": "flash, efficient, math (no cuDNN)"}}
    for record in (committed, newer):
        run_dir = tmp_path / "rec" / "translation" / record["method"] / "lr0.001-nall"
        run_dir.mkdir(parents=True)
        (run_dir / "record-test-beam.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert report(tmp_path / "rec", readme=readme) == 0
    rows = {line.split(" | ")[1]: line for line in (tmp_path / "rec" / "RESULTS.md").read_text().splitlines()
            if line.startswith("| translation |") and " | all | " in line}  # the table of every test run
    assert rows["none"].count("(cuDNN attn.)") == 2  # training time and generation speed
    assert "cuDNN" not in rows["lora"]
    assert "Times marked (cuDNN attn.)" in (tmp_path / "rec" / "RESULTS.md").read_text()


@pytest.mark.slow  # it compiles a tiny model's blocks (about 15 s on two CPU cores)
def test_training_times_of_compiled_runs_are_marked(tmp_path, tiny_models, tiny_data):
    """A test record says whether its model trained with compiled blocks, and the report marks those times."""
    out = tmp_path / "run"
    for compiled in (False, True):
        config = build_config({"task": "dialogue", "method": "lora", "model": str(tiny_models["llama"]),
                               "data_dir": str(tiny_data), "output_dir": str(out), "overwrite": True,
                               "max_steps": 1, "report_to": "none", "compile": compiled, "max_new_tokens": 4})
        train(config)
        record = run_test(config)
        assert record["train"]["compiled"] is compiled
        run_dir = tmp_path / "rec" / "dialogue" / ("lora" if compiled else "none") / "lr0.001-nall"
        run_dir.mkdir(parents=True)
        (run_dir / "record-test-greedy.json").write_text(json.dumps({**record, "method": run_dir.parent.name}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert report(tmp_path / "rec", readme=readme) == 0
    details = (tmp_path / "rec" / "RESULTS.md").read_text()
    rows = {line.split(" | ")[1]: line for line in details.splitlines() if line.startswith("| dialogue |")}
    assert rows["lora"].count("(compiled)") == 1 and "(compiled)" not in rows["none"]
    assert "Training times marked (compiled)" in details


def test_archived_records_are_neither_reported_nor_searched(tmp_path):
    """Runs of settings the study dropped stay in results/archive/ as evidence, out of the table and plots."""
    archived = REPO / "results" / "archive"
    assert list(archived.rglob("record-test-*.json")) and list(archived.rglob("lr_search.json"))
    shutil.copytree(archived, tmp_path / "rec" / "archive")
    assert load_records(tmp_path / "rec") == [] and load_searches(tmp_path / "rec") == []
    shutil.copytree(archived / "2026-11-26-lora-dropout-0.05" / "translation", tmp_path / "rec" / "translation")
    assert [r["method"] for r in load_records(tmp_path / "rec")] == ["lora"]  # the same files, not archived
    assert [s["method"] for s in load_searches(tmp_path / "rec")] == ["lora"]


def test_search_table_marks_a_selected_rate_left_at_the_edge():
    """A search that ran out of steps outward while its largest rate still won says so; one with a worse rate on
    each side of the winner does not."""
    from peft_nlg.report import search_table
    at_edge = {"task": "translation", "method": "lora", "selected_lr": 0.004,
               "valid_loss_by_lr": {"0.001": 2.6, "0.002": 2.5, "0.004": 2.4}}
    inside = {"task": "translation", "method": "none", "selected_lr": 0.002,
              "valid_loss_by_lr": {"0.001": 2.6, "0.002": 2.4, "0.004": 2.5}}
    rows = search_table([at_edge, inside]).splitlines()[2:]
    assert rows[0].endswith("| 0.002 |") and "none" in rows[0]
    assert rows[1].endswith("| 0.004 (edge: the best may lie beyond) |") and "lora" in rows[1]


def test_report_check_covers_the_readme_block_results_md_and_every_plot(tmp_path, capsys):
    """The README block shows the plots, and each PNG carries a fingerprint of what it was drawn from, so
    `report --check` fails on a stale or missing plot and on an edited RESULTS.md, as on an edited table
    (the committed study's records as input)."""
    from PIL import Image

    rec = tmp_path / "rec"
    for task in ("translation", "dialogue"):
        shutil.copytree(REPO / "results" / task, rec / task)
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")

    def check() -> str:
        capsys.readouterr()
        assert report(rec, check=True, readme=readme) == 1
        return capsys.readouterr().err

    assert report(rec, readme=readme) == 0 and report(rec, check=True, readme=readme) == 0
    block = readme.read_text()
    assert "![Quality against trainable parameters" in block and "](rec/quality_vs_cost.png)" in block
    # every plot drawn is shown, and only those (the learning curves once the ladder has a rung)
    linked = {line.split("](rec/")[1].rstrip(")") for line in block.splitlines() if line.startswith("![")}
    assert linked == {p.name for p in rec.glob("*.png")} >= {"quality_vs_cost.png", "peak_memory.png"}
    with Image.open(rec / "peak_memory.png") as image:
        assert len(image.text["peft-nlg data"]) == 64

    # a table run's score changed: the table, RESULTS.md and the quality plot no longer show the records
    selected = json.loads((rec / "translation" / "lora" / "lr_search.json").read_text())["selected_lr"]
    path = next((rec / "translation" / "lora" / f"lr{selected:g}-nall").glob("record-test-*.json"))
    record = json.loads(path.read_text())
    record["scores"]["bleu"] += 1
    path.write_text(json.dumps(record))
    err = check()
    assert "README.md: results table differs" in err and "RESULTS.md: differs from the records" in err
    assert "quality_vs_cost.png: drawn from other records" in err and "peak_memory.png" not in err
    assert report(rec, readme=readme) == 0 and report(rec, check=True, readme=readme) == 0

    # a plot deleted, or the same picture saved again without its fingerprint, is named
    (rec / "peak_memory.png").unlink()
    assert "peak_memory.png: missing" in check()
    assert report(rec, readme=readme) == 0
    with Image.open(rec / "quality_vs_cost.png") as image:
        image.load()
        image.save(rec / "quality_vs_cost.png")
    err = check()
    assert "quality_vs_cost.png: drawn from other records" in err and "README.md" not in err
    assert report(rec, readme=readme) == 0

    # RESULTS.md edited by hand
    details = rec / "RESULTS.md"
    details.write_text(details.read_text().replace("| translation | lora |", "| translation | LoRA |", 1))
    err = check()
    assert err.strip().startswith(f"{details}: differs from the records") and len(err.strip().splitlines()) == 1


def test_records_made_on_other_data_are_refused_by_the_grid_and_the_report(tiny_models, tiny_data, tmp_path,
                                                                          capsys):
    """A split rebuilt since (newer sources, other sizes) must not mix with runs made before it: the grid
    refuses to reuse their records before running anything, does not take a work dir's model trained on the
    old data, and the report refuses a table whose records of one task saw different examples."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    spec = GridSpec(tasks=["translation"], methods=["lora"], lr_factors=[1.0], ladder=[2], token_budget=200,
                    overrides={"model": str(tiny_models["llama"]), "data_dir": str(data), "report_to": "none",
                               "max_new_tokens": 3, "patience": 100})
    records, work, quiet = tmp_path / "rec", tmp_path / "work", (lambda *_: None)
    run_grid(spec, records, work, log=quiet)
    # what the grid computes for a check is what training records, for the full split and a ladder rung
    for path in records.rglob("record-train.json"):
        record = json.loads(path.read_text())
        assert data_fingerprints(build_config(record["config"])) == record["data_fingerprints"]
    before = {p: p.read_bytes() for p in records.rglob("*.json")}

    train_file, test_file = data / "translation" / "train.jsonl", data / "translation" / "test.jsonl"
    original_train, original_test = train_file.read_text(), test_file.read_text()
    train_file.write_text(original_train.replace("a", "A", 1))  # one character of one example
    with pytest.raises(ValueError, match=r"lora/lr[^/]*-nall/record-train\.json: made with train examples \w+ "
                                         r"\(now \w+\)"):
        run_grid(spec, records, work, log=quiet)
    capsys.readouterr()
    assert cli.main(["grid", "--plan", "--tasks", "translation", "--methods", "lora", "--lr-factors", "1",
                     "--ladder", "2", "--token-budget", "200", "--records", str(records), "--set",
                     f"model={tiny_models['llama']},data_dir={data},report_to=none,max_new_tokens=3,patience=100,"
                     "batch_tokens=0"]) != 0
    assert "record-train.json: made with train examples" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in records.rglob("*.json")}  # nothing ran, nothing was rewritten
    # moved away, the runs are made again on the new data, not taken from the work dir's old model
    fresh = run_grid(spec, tmp_path / "rec-new", work, log=quiet)
    retrained = {r["train"]["data_fingerprints"]["train"] for r in fresh
                 if r["train"] and not r["grid"]["train_examples"]}
    assert retrained == {data_fingerprints(build_config({**spec.overrides, "task": "translation"}))["train"]}

    train_file.write_text(original_train)
    test_file.write_text(original_test.replace("a", "A", 1))
    with pytest.raises(ValueError, match=r"zero_shot/record-test-greedy\.json: made with test examples"):
        run_grid(spec, records, work, log=quiet)
    test_file.write_text(original_test)
    run_grid(spec, records, work, log=quiet)  # the same data again: reused as it is
    assert before == {p: p.read_bytes() for p in records.rglob("*.json")}

    # the report: one task's records scored on other test examples, or a ladder rung on another subset
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    assert report(records, readme=readme) == 0
    rung = next(records.glob("translation/lora/lr*-n2/record-test-*.json"))
    edited = json.loads(rung.read_text())
    edited["test_fingerprint"] = "0" * 16
    rung.write_text(json.dumps(edited))
    written = readme.read_text()
    assert report(records, readme=readme) == 1 and report(records, check=True, readme=readme) == 1
    assert readme.read_text() == written  # refused before anything was written
    assert [line.split(": its")[0] for line in mixed_data(load_records(records))] == [str(rung)]
    edited["test_fingerprint"] = json.loads(before[rung])["test_fingerprint"]
    edited["train"]["data_fingerprints"]["train"] = "1" * 16
    rung.write_text(json.dumps(edited))
    assert mixed_data(load_records(records)) == []  # alone on its subset: nothing to compare it with
    for name in ("-a", "-b"):  # two more runs of that size on the subset the grid chose
        (rung.parent.parent / (rung.parent.name + name)).mkdir()
        (rung.parent.parent / (rung.parent.name + name) / rung.name).write_bytes(before[rung])
    problems = mixed_data(load_records(records))
    assert len(problems) == 1 and problems[0].startswith(f"{rung}: its training examples ({'1' * 16}) differ")
