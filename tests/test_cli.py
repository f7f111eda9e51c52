"""The whole tool through its command line: every method on every architecture, train -> test ->
inference; the original run.py flags; clear one-line errors on bad input; no silent overwrites."""

import argparse
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES

from peft_nlg import cli
from peft_nlg.config import DECODING_SETTINGS, TEST_SETTINGS, RunConfig, build_config
from peft_nlg.evaluation import inference
from peft_nlg.methods import METHODS
from peft_nlg.models import compile_repeated_layers
from peft_nlg.runtime import load_for_training

REPO = Path(__file__).resolve().parents[1]
TASK_FOR_ARCH = {"llama": "dialogue", "t5": "translation", "marian": "translation", "blenderbot_small": "dialogue"}


def _run(*args) -> int:
    return cli.main([str(a) for a in args])


def _train_args(model, data, out, task, method, *extra):
    return ["train", "--task", task, "--method", method, "--model", model, "--data-dir", data, "--output-dir", out,
            "--max-steps", 3, "--eval-every", 2, "--learning-rate", 1e-3, "--report-to", "none", *extra]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_train_test_inference(tiny_models, tiny_data, tmp_path, arch, method):
    task, out = TASK_FOR_ARCH[arch], tmp_path / "run"
    assert _run(*_train_args(tiny_models[arch], tiny_data, out, task, method)) == 0
    record = json.loads((out / "train_record.json").read_text())
    assert record["steps"] == 3 and record["train_tokens"] > 0 and record["best_valid_loss"] > 0
    assert [h["step"] for h in record["history"]] == [2, 3]
    assert (out / "model" / ("adapter_config.json" if method != "none" else "config.json")).is_file()
    assert (out / "config.yaml").is_file() and (out / "checkpoint" / "state.json").is_file()
    assert 0 < record["trainable_params"] <= record["total_params"]

    for search in ("greedy", "beam"):
        assert _run("test", "--task", task, "--method", method, "--data-dir", tiny_data, "--output-dir", out,
                    "--search", search, "--num-beams", 2, "--max-new-tokens", 6) == 0
        test_record = json.loads((out / f"record-test-{search}.json").read_text())
        predictions = (out / f"predictions-test-{search}.jsonl").read_text().splitlines()
        assert len(predictions) == test_record["test_examples"] == 3
        assert test_record["decoding"]["search"] == search
        assert test_record["main_metric"] in test_record["scores"]
        assert test_record["trainable_params"] == record["trainable_params"]

    from peft_nlg.config import build_config
    config = build_config({"task": task, "method": method, "output_dir": str(out), "data_dir": str(tiny_data),
                           "max_new_tokens": 5})
    stdout = io.StringIO()
    inference(config, stdin=io.StringIO("Where is the station?\n\nHi there\nquit\nnever read\n"), stdout=stdout)
    assert len(stdout.getvalue().split("\n")) == 4  # one line per input line (blank in, blank out), then quit


def test_resume_continues_and_overwrite_is_explicit(tiny_models, tiny_data, tmp_path, capsys):
    out, model = tmp_path / "run", tiny_models["llama"]
    args = _train_args(model, tiny_data, out, "translation", "lora")
    assert _run(*args) == 0
    assert _run(*args) == 2  # refuses to replace the earlier run
    assert "--resume" in capsys.readouterr().err
    resumed = [a if a != 3 else 5 for a in args]  # ask for 5 steps in total
    assert _run(*resumed, "--resume") == 0
    record = json.loads((out / "train_record.json").read_text())
    assert record["steps"] == 5 and [h["step"] for h in record["history"]] == [2, 3, 4, 5]
    assert _run(*args, "--overwrite") == 0
    assert json.loads((out / "train_record.json").read_text())["steps"] == 3
    # without checkpoints (GPU slots, whose disks do not survive) the model is still kept; resume has nothing
    assert _run(*args, "--overwrite", "--no-save-checkpoints") == 0
    assert (out / "model").is_dir() and not (out / "checkpoint").exists()


def test_a_moved_run_directory_is_tested_where_it_now_is(tiny_models, tiny_data, tmp_path):
    """config.yaml keeps the directory a run was trained in; test mode must read the model from, and write its
    record to, the directory it is given, not that saved path (which may be gone, or hold another run)."""
    trained, moved = tmp_path / "trained", tmp_path / "elsewhere" / "run"
    assert _run(*_train_args(tiny_models["llama"], tiny_data, trained, "translation", "lora")) == 0
    moved.parent.mkdir()
    trained.rename(moved)
    assert _run("test", "--task", "translation", "--method", "lora", "--data-dir", tiny_data, "--output-dir", moved,
                "--max-new-tokens", 4) == 0
    assert json.loads((moved / "record-test-greedy.json").read_text())["config"]["output_dir"] == str(moved)
    assert not trained.exists()


def test_zero_shot_scores_the_base_model(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "zs"
    assert _run("test", "--zero-shot", "--task", "summarization", "--model", tiny_models["t5"], "--data-dir",
                tiny_data, "--output-dir", out, "--max-new-tokens", 4) == 0
    record = json.loads((out / "record-test-greedy.json").read_text())
    assert record["method"] == "zero_shot" and record["trainable_params"] == 0
    assert set(record["scores"]) == {"rouge1", "rouge2", "rougeL"}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_test_mode_folds_lora_and_ia3_into_the_base_weights_with_the_same_outputs(tiny_models, tiny_data, tmp_path,
                                                                                 arch, method):
    """--merge-adapter yes folds the methods that can be folded (LoRA, IA3) into the base weights, so the model
    generating has no adapter layers left; in fp32 it writes what the adapter as loaded writes. Methods that
    cannot be folded generate as loaded, whatever the setting."""
    from peft import PeftModel

    from peft_nlg.evaluation import trained_config
    from peft_nlg.runtime import load_trained

    task, out = TASK_FOR_ARCH[arch], tmp_path / "run"
    assert _run(*_train_args(tiny_models[arch], tiny_data, out, task, method, "--precision", "fp32",
                             "--learning-rate", 1e-2)) == 0
    predictions, merged = {}, {}
    for setting in ("no", "yes", "auto"):
        assert _run("test", "--task", task, "--method", method, "--data-dir", tiny_data, "--output-dir", out,
                    "--max-new-tokens", 8, "--merge-adapter", setting, "--overwrite") == 0
        merged[setting] = json.loads((out / "record-test-greedy.json").read_text())["generation"]["adapter_merged"]
        predictions[setting] = (out / "predictions-test-greedy.jsonl").read_text()
    folds = METHODS[method].merges_into_base
    assert merged == {"no": False, "yes": folds, "auto": folds}  # auto folds fp32 weights: nothing is lost
    assert predictions["yes"] == predictions["no"] == predictions["auto"]
    config = trained_config(build_config({"task": task, "method": method, "output_dir": str(out),
                                          "data_dir": str(tiny_data), "merge_adapter": "yes"}))
    model = load_trained(out, config, torch.device("cpu"), torch.float32).model
    adapter_layers = [name for name, _ in model.named_modules() if "lora_" in name or "ia3_" in name]
    if folds:
        assert not isinstance(model, PeftModel) and not adapter_layers
    else:
        assert isinstance(model, PeftModel) == METHODS[method].is_peft


def _lora_with_update(model_path, dtype, update: float):
    """A LoRA model whose base weights are all 1 and whose adapter adds exactly ``update`` to every weight."""
    from peft.tuners.lora import LoraLayer

    config = build_config({"task": "dialogue", "method": "lora", "model": str(model_path)})
    loaded = load_for_training(config, torch.device("cpu"), dtype)
    for layer in loaded.model.modules():
        if isinstance(layer, LoraLayer):
            layer.get_base_layer().weight.data.fill_(1.0)
            rank, scale = layer.r["default"], layer.scaling["default"]
            layer.lora_A["default"].weight.data.fill_(1.0)  # B @ A * scale = rank * (update / (rank * scale)) * scale
            layer.lora_B["default"].weight.data.fill_(update / (rank * scale))
    return loaded


@pytest.mark.parametrize(("dtype", "update", "error"), [
    (torch.bfloat16, 1e-3, 1.0),    # below half of bf16's step at 1.0 (2^-8): every update is lost
    (torch.bfloat16, 0.25, 0.0),    # 1.25 is a bf16 number: nothing is lost
    (torch.bfloat16, 0.0, 0.0),     # an untrained adapter changes nothing, so folding it loses nothing
    (torch.float32, 1e-3, 0.0),     # fp32 keeps it (up to fp32 rounding)
])
def test_auto_folds_an_adapter_only_when_the_folded_weights_keep_its_update(tiny_models, dtype, update, error):
    """auto measures what folding would lose of the adapter's weight update (fold_error) and folds within
    FOLD_TOLERANCE; yes folds anyway; no never does."""
    from peft_nlg.runtime import FOLD_TOLERANCE, fold_adapter_for_generation, fold_error

    assert fold_error(_lora_with_update(tiny_models["llama"], dtype, update).model) == pytest.approx(error, abs=1e-3)
    for setting, expected in (("auto", error <= FOLD_TOLERANCE), ("yes", True), ("no", False)):
        loaded = fold_adapter_for_generation(_lora_with_update(tiny_models["llama"], dtype, update), setting)
        assert loaded.adapter_merged is expected
        assert any("lora_" in name for name, _ in loaded.model.named_modules()) is not expected
    with pytest.raises(ValueError, match="merge_adapter must be"):
        fold_adapter_for_generation(loaded, "always")


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens"], ["q_proj", "embed_tokens", "lm_head"]])
def test_an_adapter_on_tied_embeddings_is_never_folded(tiny_models, targets):
    """The tiny Llama ties its input and output embeddings: folding a LoRA on them would write the update into the
    shared weight (changing the head as well, or adding it twice), so auto keeps the adapter as loaded, with the
    same logits, and yes refuses in one clear line. An adapter on untied layers alone still folds."""
    from peft_nlg.runtime import fold_adapter_for_generation, layers_sharing_adapted_weights

    def perturbed_lora(target_modules):
        torch.manual_seed(0)
        config = build_config({"task": "dialogue", "method": "lora", "model": str(tiny_models["llama"]),
                               "method_options": {"target_modules": target_modules}})
        loaded = load_for_training(config, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            for param in loaded.model.parameters():
                if param.requires_grad:
                    param.add_(0.3 * torch.randn_like(param))
        loaded.model.eval()
        return loaded

    ids = torch.tensor([[3, 10, 11, 12, 4, 13, 14]])
    loaded = perturbed_lora(targets)
    assert any("embed_tokens" in name for name in layers_sharing_adapted_weights(loaded.model))
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
    kept = fold_adapter_for_generation(loaded, "auto")
    assert kept.adapter_merged is False
    with torch.no_grad():
        torch.testing.assert_close(kept.model(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="shared with another module"):
        fold_adapter_for_generation(perturbed_lora(targets), "yes")
    untied = perturbed_lora(["q_proj", "v_proj"])
    assert layers_sharing_adapted_weights(untied.model) == []
    assert fold_adapter_for_generation(untied, "auto").adapter_merged is True


def test_parameters_tied_as_views_of_one_memory_count_once(tiny_models):
    """peft's ensure_weight_tying makes the head's LoRA A a view of the embedding's LoRA B (two Parameter
    objects; over fp32 weights peft keeps them so): a count must take those values once, as it takes the tied
    base weight once. Training refuses the option, in one clear line (the optimizer would step them twice)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_nlg.models import count_parameters

    def counts(**options):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
        return count_parameters(get_peft_model(model, LoraConfig(r=4, **options)))[0]

    vocab, hidden = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).get_input_embeddings().weight.shape
    q_only = counts(target_modules=["q_proj"])
    tied = counts(target_modules=["q_proj", "embed_tokens", "lm_head"], ensure_weight_tying=True)
    untied = counts(target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert tied - q_only == 4 * (vocab + hidden)          # one adapter: A [4, vocab] and B [hidden, 4]
    assert untied - q_only == 2 * 4 * (vocab + hidden)    # two adapters, one per side
    config = build_config({"task": "dialogue", "method": "lora", "model": str(tiny_models["llama"]),
                           "method_options": {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True}})
    with pytest.raises(ValueError, match="ensure_weight_tying is not supported for training"):
        load_for_training(config, torch.device("cpu"), torch.float32)


def test_bad_test_file_is_one_clear_line(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert _run(*_train_args(tiny_models["t5"], tiny_data, out, "translation", "ia3")) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a", "trg": "b"}\n{"src": "a", "trg": \n')
    proc = subprocess.run([sys.executable, "-m", "peft_nlg.cli", "test", "--task", "translation", "--method", "ia3",
                           "--output-dir", str(out), "--test-file", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("peft-nlg: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"peft-nlg: error: {bad}:2: malformed JSON")
    assert not list(out.glob("record-bad-*"))  # nothing written for a failed run


def _flags_of(command: str) -> set[str]:
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in subcommands.choices[command]._actions}


def test_every_setting_is_a_flag_of_the_commands_it_concerns():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert DECODING_SETTINGS | TEST_SETTINGS <= fields  # a misspelt name would otherwise be skipped silently
    train, test, infer = _flags_of("train"), _flags_of("test"), _flags_of("inference")
    assert fields <= train | test | infer  # a new setting no command offers could never be set
    assert DECODING_SETTINGS <= test & infer and not DECODING_SETTINGS & train
    assert TEST_SETTINGS <= test and not TEST_SETTINGS & (train | infer)
    assert {"learning_rate", "method_options", "epochs"} <= train - test - infer
    # the prompt is part of what was trained: test and inference take it from the run, never a flag
    assert {"instruction", "instruction_turn"} <= train - test - infer


@pytest.mark.parametrize("command", ["setup", "train", "test", "inference", "grid", "report"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help texts with %: a setting's help with a bare % (\"within 5%\") broke test -h."""
    with pytest.raises(SystemExit) as exit_info:
        _run(command, "-h")
    assert exit_info.value.code == 0 and f"usage: peft-nlg {command}" in capsys.readouterr().out


def test_run_py_maps_the_original_flags():
    sys.path.insert(0, str(REPO))
    import run
    assert run.translate_args(["-task", "translation", "-mode", "train", "-peft", "LoRA", "-search", "beam"]) == [
        "train", "--task", "translation", "--method", "lora"]
    assert run.translate_args(["-task", "dialogue", "-mode", "test", "-peft", "vanilla", "-search", "beam",
                               "--max-test-examples", "5"]) == [
        "test", "--task", "dialogue", "--method", "none", "--search", "beam", "--max-test-examples", "5"]
    assert run.translate_args(["-task", "summarization", "-mode", "inference", "-peft", "Prefix_Tuning"])[:5] == [
        "inference", "--task", "summarization", "--method", "prefix_tuning"]
    with pytest.raises(SystemExit):
        run.translate_args(["-task", "translation", "-mode", "train", "-peft", "adapters"])


def test_run_py_end_to_end(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_data), "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "-task", "translation", "-mode", "train", "-peft",
                           "P_TUNING", "--model", str(tiny_models["marian"]), "--max-steps", "2", *common],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "-task", "translation", "-mode", "test", "-peft",
                           "p_tuning", "-search", "beam", "--max-new-tokens", "4", *common],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "translation/p_tuning (beam, 3 examples): bleu" in proc.stdout


def test_presets_and_layered_defaults():
    from peft_nlg.config import build_config
    config = build_config({"task": "summarization", "method": "LoRA"}, preset="original")
    assert config.model == "google-t5/t5-small" and config.method == "lora"
    assert config.learning_rate == 5e-4 and config.method_options["r"] == 16  # defaults/methods.yaml
    assert config.max_source_tokens == 320  # defaults/tasks.yaml
    config = build_config({"task": "translation", "method": "lora", "method_options": {"r": 4}})
    assert config.method_options == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.0}
    with pytest.raises(ValueError, match="unknown setting"):
        build_config({"task": "translation", "no_such_setting": 1})


def test_method_options_take_lists_and_mappings_in_brackets(tiny_models):
    """peft options such as target_modules are lists: commas inside brackets stay in the value."""
    parsed = cli._parse_options("r=8, target_modules=[q_proj,v_proj, lm_head],ensure_weight_tying=true,"
                                "trainable_token_indices={embed_tokens: [1, 2]}")
    assert parsed == {"r": 8, "target_modules": ["q_proj", "v_proj", "lm_head"], "ensure_weight_tying": True,
                      "trainable_token_indices": {"embed_tokens": [1, 2]}}
    for bad, message in (("r", "expected key=value, got 'r'"), ("target_modules=[q_proj,v_proj", "cannot read")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            cli._parse_options(bad)
    config = build_config({"task": "translation", "method": "lora", "model": str(tiny_models["llama"]),
                           "method_options": cli._parse_options("target_modules=[q_proj,lm_head]")})
    model = load_for_training(config, torch.device("cpu"), torch.float32).model
    adapted = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith((".q_proj", "lm_head"))
               and hasattr(model.get_submodule(name), "lora_A")}
    assert adapted == {"q_proj", "lm_head"}


def test_tensorboard_logs_are_written(tiny_models, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in _train_args(tiny_models["llama"], tiny_data, out, "dialogue", "lora") if a != "none"]
    args = args[: args.index("--report-to")] + ["--max-steps", 10]
    assert _run(*args) == 0
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow  # compiling takes about a minute per architecture on two CPU cores
@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("t5", "ia3"), ("marian", "prompt_tuning")])
def test_compiled_blocks_train_like_eager(tiny_models, tiny_data, tmp_path, arch, method):
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        assert _run(*_train_args(tiny_models[arch], tiny_data, out, TASK_FOR_ARCH[arch], method,
                                 "--compile" if compiled else "--no-compile", "--max-steps", 4)) == 0
        runs[compiled] = json.loads((out / "train_record.json").read_text())
        assert runs[compiled]["compiled"] is compiled
    eager, compiled = runs[False]["history"], runs[True]["history"]
    assert [h["step"] for h in eager] == [h["step"] for h in compiled]
    for a, b in zip(eager, compiled, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-3)

    config = build_config({"task": TASK_FOR_ARCH[arch], "method": method, "model": str(tiny_models[arch])})
    model = load_for_training(config, torch.device("cpu"), torch.float32).model
    expected = {"llama": 2, "t5": 4, "marian": 4}[arch]  # the tiny configs' blocks (encoder + decoder)
    assert compile_repeated_layers(model) == expected


@pytest.mark.parametrize("method", ["none", "lora"])
def test_best_weights_kept_in_memory_are_the_ones_saved_at_each_improvement(tiny_models, tmp_path, monkeypatch,
                                                                            method):
    """Without checkpoints the best weights are written once, at the end, and they are exactly the weights the
    checkpointing path writes at the best validation (in a run that overfits: its last step is not its best)."""
    from conftest import TINY_PAIRS

    from peft_nlg import training

    data = tmp_path / "data" / "translation"
    data.mkdir(parents=True)
    for split, rows in (("train", TINY_PAIRS["translation"]), ("valid", TINY_PAIRS["dialogue"][:3])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"src": s, "trg": t}) + "\n" for s, t in rows))
    saves = []
    original = training._save_best
    monkeypatch.setattr(training, "_save_best", lambda out, *a: (saves.append(out.name), original(out, *a)))
    records = {}
    for name, checkpoints in (("disk", True), ("memory", False)):
        config = build_config({"task": "translation", "method": method, "model": str(tiny_models["llama"]),
                               "data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / name),
                               "report_to": "none", "max_steps": 10, "eval_every": 1, "patience": 100,
                               "learning_rate": 3e-2, "save_checkpoints": checkpoints})
        records[name] = training.train(config)
    assert records["disk"]["history"] == records["memory"]["history"]
    assert records["memory"]["best_step"] < 10  # the last weights are not the best ones
    assert saves.count("memory") == 1 < saves.count("disk")
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    saved = {name: (tmp_path / name / "model" / weights).read_bytes() for name in records}
    assert saved["memory"] == saved["disk"]



def test_profiled_steps_write_an_op_table(tiny_models, tiny_data, tmp_path):
    """--profile-steps: where a step's time goes, for steps 7 and 8 (after warm-up), without changing the run."""
    out = tmp_path / "run"
    assert _run("train", "--task", "translation", "--method", "lora", "--model", tiny_models["llama"], "--data-dir",
                tiny_data, "--output-dir", out, "--max-steps", 9, "--report-to", "none", "--profile-steps", 2) == 0
    profile = (out / "profile.txt").read_text()
    assert profile.startswith("2 steps in ") and "ms per step" in profile
    assert "aten::mm" in profile or "aten::addmm" in profile  # the op table, with the model's matrix products


def test_device_busy_time_counts_each_kernel_once():
    """Rows as the H200 profile of full fine-tuning gave them (3 steps): the step annotation spans 852 ms on the
    device, the aten::mm row carries its kernels' 61 ms, and the kernels themselves ran 61 + 232 ms."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from peft_nlg.runtime import device_busy_seconds

    def row(key, device_ms, device_type, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=device_ms * 1000, device_type=device_type,
                               is_user_annotation=annotation)

    rows = [row("ProfilerStep*", 851.9, DeviceType.CUDA, annotation=True), row("aten::mm", 61.1, DeviceType.CPU),
            row("nvjet_sm90_tst_192x192", 61.1, DeviceType.CUDA), row("elementwise_kernel", 232.0, DeviceType.CUDA),
            row("Memcpy DtoD (Device -> Device)", 4.0, DeviceType.CUDA), row("ProfilerStep#6", 0.0, DeviceType.CPU)]
    assert device_busy_seconds(rows) == pytest.approx(0.2971)


def test_compiled_blocks_by_default_only_for_long_gpu_runs_of_methods_that_gain_from_them():
    from peft_nlg.config import COMPILE_MIN_STEPS
    from peft_nlg.training import use_compiled_blocks

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    lora, prefix = METHODS["lora"], METHODS["prefix_tuning"]
    unset = build_config({"method": "lora"})
    assert unset.compile is None
    assert use_compiled_blocks(unset, lora, gpu, COMPILE_MIN_STEPS)[0] is True
    assert use_compiled_blocks(unset, lora, gpu, COMPILE_MIN_STEPS - 1)[0] is False
    assert use_compiled_blocks(unset, lora, cpu, 10 * COMPILE_MIN_STEPS)[0] is False
    for asked in (True, False):
        config = build_config({"method": "lora", "compile": asked})
        assert use_compiled_blocks(config, lora, cpu, 1) == (asked, "--compile" if asked else "--no-compile")
    on, reason = use_compiled_blocks(build_config({"method": "prefix_tuning", "compile": True}), prefix, gpu, 10**4)
    assert on is False and "cannot share one compiled graph" in reason
    # full fine-tuning measured slower compiled: eager by default however long the run, compiled when asked
    full = METHODS["none"]
    on, reason = use_compiled_blocks(build_config({"method": "none"}), full, gpu, 10 * COMPILE_MIN_STEPS)
    assert on is False and reason == f"default: {full.eager_by_default}" and "0.68x" in reason
    assert use_compiled_blocks(build_config({"method": "none", "compile": True}), full, gpu, 10**4)[0] is True
    assert [m for m in METHODS if not METHODS[m].eager_by_default] == ["lora", "prefix_tuning", "p_tuning",
                                                                       "prompt_tuning", "ia3"]


def test_a_run_records_whether_it_trained_compiled_and_why(tiny_models, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(*_train_args(tiny_models["llama"], tiny_data, out, "translation", "prefix_tuning", "--compile")) == 0
    record = json.loads((out / "train_record.json").read_text())
    assert record["compiled"] is False and record["compiled_reason"] == (
        "prefix_tuning's blocks cannot share one compiled graph")
    assert "compiled blocks: off (prefix_tuning's blocks cannot share one compiled graph)" in capsys.readouterr().out
