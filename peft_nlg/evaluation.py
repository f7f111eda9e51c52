"""Test and inference modes: load the trained model, generate, score, write one record per run."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from peft_nlg.config import DECODING_SETTINGS, TEST_SETTINGS, RunConfig, load_config_file
from peft_nlg.data.io import read_pairs, write_json, write_jsonl
from peft_nlg.data.splits import fingerprint
from peft_nlg.generation import DecodingSettings, generate
from peft_nlg.models import count_parameters
from peft_nlg.runtime import (
    Loaded,
    command_line,
    compute_dtype,
    device,
    dir_size_bytes,
    hardware,
    load_base,
    load_trained,
    now_iso,
    package_versions,
    peak_memory_gb,
    read_json,
    reset_peak_memory,
)
from peft_nlg.tasks import get_task
from peft_nlg.training import RunExistsError, split_path

ZERO_SHOT = "zero_shot"
AUTO = "auto"
SEARCH_FILE = "decoding_search.json"  # what --search auto chose for a run; inference --search auto reads it


def trained_config(config: RunConfig) -> RunConfig:
    """The training run's configuration with this command's decoding and test settings on top."""
    saved_path = config.out / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{saved_path}: no training run here; run `peft-nlg train` first "
                                "(or pass --output-dir of a trained run)")
    saved = load_config_file(saved_path)
    for name in DECODING_SETTINGS | TEST_SETTINGS | {"overwrite", "data_dir", "threads", "cudnn_attention"}:
        setattr(saved, name, getattr(config, name))
    # the run is where its config.yaml was found: a run directory copied or moved elsewhere is read and written
    # there, not at the path it was trained under
    saved.output_dir = str(config.out)
    return saved


def decoding(config: RunConfig, on_gpu: bool) -> DecodingSettings:
    if config.search == AUTO:
        raise ValueError("--search auto is resolved by the decoding search before generating")
    sizes = config.resolved_sizes(on_gpu)
    return DecodingSettings(search=config.search, num_beams=config.num_beams,
                            max_new_tokens=config.max_new_tokens or get_task(config.task).max_new_tokens,
                            batch_tokens=sizes["gen_batch_tokens"], max_batch_size=sizes["gen_max_batch_size"],
                            no_repeat_ngram=config.no_repeat_ngram, temperature=config.temperature,
                            top_p=config.top_p, seed=config.seed, cudnn_attention=config.cudnn_attention,
                            greedy_loop=config.greedy_loop, decode_attention=config.decode_attention)


def search_decoding(config: RunConfig, loaded: Loaded, dev, dtype) -> dict:
    """``--search auto``: generate for the validation split with each of the task's decoding candidates and
    pick one by the task's rule. The test split plays no part. Returns the whole search, winner included."""
    task, on_gpu = loaded.task, dev.type == "cuda"
    if task.decoding_search is None:
        return {"rule": "greedy: the task declares no decoding search", "shown": [], "candidates": [],
                "chosen": {"search": "greedy"}, "chosen_name": "greedy"}
    examples = read_pairs(split_path(config, "valid"))[: config.max_valid_examples or None]
    sources, references = [e["src"] for e in examples], [e["trg"] for e in examples]
    tried = []
    for candidate in task.decoding_search.candidates:
        settings = decoding(dataclasses.replace(config, **candidate), on_gpu)
        predictions, _ = generate(loaded.model, loaded.tokenizer, loaded.prompter, sources, settings, dev, dtype,
                                  show_progress=False)
        tried.append({"decoding": candidate, "name": settings.describe(),
                      "scores": task.metrics(predictions, references)})
    rule = task.decoding_search
    best = rule.choose([t["scores"] for t in tried], task.main_metric)
    return {"rule": rule.describe(task.main_metric), "shown": rule.shown(task.main_metric, task.second_metric),
            "valid_examples": len(examples),
            "valid_fingerprint": fingerprint(examples), "candidates": tried,
            "chosen": tried[best]["decoding"], "chosen_name": tried[best]["name"]}


def load_for_generation(config: RunConfig, zero_shot: bool) -> tuple[RunConfig, Loaded, object, object]:
    import torch
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = device()
    if not zero_shot:
        config = trained_config(config)
    dtype = compute_dtype(config, dev)
    loaded = load_base(config, dev, dtype) if zero_shot else load_trained(config.out, config, dev, dtype)
    return config, loaded, dev, dtype


def scored_examples(config: RunConfig) -> tuple[Path, list[dict]]:
    """The file test mode scores and the examples it takes from it."""
    path = Path(config.test_file) if config.test_file else split_path(config, "test")
    examples = read_pairs(path)
    return path, examples[: config.max_test_examples] if config.max_test_examples else examples


def test(config: RunConfig, zero_shot: bool = False) -> dict:
    """Generate for the test split (or --test-file), score it, write predictions and a record."""
    config, loaded, dev, dtype = load_for_generation(config, zero_shot)
    out, decoding_search = config.out, None
    if config.search == AUTO:
        if (out / SEARCH_FILE).exists() and not config.overwrite:
            raise RunExistsError(f"{out / SEARCH_FILE}: exists (an earlier --search auto); pass --overwrite to "
                                 "search again")
        decoding_search = search_decoding(config, loaded, dev, dtype)
        config = dataclasses.replace(config, **decoding_search["chosen"])
    settings = decoding(config, dev.type == "cuda")
    name = f"{'test' if not config.test_file else Path(config.test_file).stem}-{settings.search}"
    record_path, predictions_path = out / f"record-{name}.json", out / f"predictions-{name}.jsonl"
    if record_path.exists() and not config.overwrite:
        raise RunExistsError(f"{record_path}: exists; pass --overwrite to replace it")
    test_path, examples = scored_examples(config)

    reset_peak_memory(dev)
    predictions, speed = generate(loaded.model, loaded.tokenizer, loaded.prompter, [e["src"] for e in examples],
                                  settings, dev, dtype)
    references = [e["trg"] for e in examples]
    scores = loaded.task.metrics(predictions, references)
    trainable, total = count_parameters(loaded.model)
    train_record_path = out / "train_record.json"
    train_record = read_json(train_record_path) if train_record_path.is_file() else {}
    record = {
        "kind": "test", "finished_at": now_iso(), "task": config.task,
        "method": ZERO_SHOT if zero_shot else config.method, "model": config.model,
        "family": loaded.family.name, "scores": scores, "main_metric": loaded.task.main_metric,
        "decoding": settings.__dict__, "decoding_search": decoding_search,
        "test_file": str(test_path), "test_examples": len(examples),
        "test_fingerprint": fingerprint(examples),
        "trainable_params": 0 if zero_shot else train_record.get("trainable_params", trainable),
        "total_params": train_record.get("total_params", total),
        "train": {k: train_record.get(k) for k in (
            "train_seconds", "train_tokens", "train_tokens_per_s", "train_examples", "steps", "best_valid_loss",
            "peak_memory_gb", "peak_memory_kind", "compute_dtype", "data_fingerprints", "command",
            "concurrent_runs", "attention_kernels", "batch_sizes")}
        # its speed differs from eager runs'; records before 2026-11-27 said it in the configuration only
        | {"compiled": bool(train_record.get("compiled", train_record.get("config", {}).get("compile")))}
        if train_record else None,
        "adapter_size_bytes": dir_size_bytes(out / "model") if (out / "model").is_dir() else 0,
        "generation": {**speed, "adapter_merged": loaded.adapter_merged, "adapter_fold_error": loaded.fold_error,
                       **{f"generation_{k}": v for k, v in peak_memory_gb(dev).items()}},
        "hardware": hardware(dev), "versions": package_versions(), "seed": config.seed,
        "config": config.to_dict(), "command": command_line(),
        "samples": [{"src": e["src"], "ref": e["trg"], "pred": p}
                    for e, p in zip(examples[:3], predictions[:3], strict=True)],
    }
    if decoding_search:
        write_json(out / SEARCH_FILE, decoding_search)
    write_jsonl(predictions_path, ({"src": e["src"], "trg": e["trg"], "prediction": p}
                                   for e, p in zip(examples, predictions, strict=True)))
    write_json(record_path, record)
    return record


def inference(config: RunConfig, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Interactive prompt on the trained model; with piped input, one output line per input line."""
    config, loaded, dev, dtype = load_for_generation(config, zero_shot=False)
    if config.search == AUTO:
        chosen = config.out / SEARCH_FILE
        if not chosen.is_file():
            raise FileNotFoundError(f"{chosen}: no decoding search for this run yet; run `peft-nlg test --search auto`")
        config = dataclasses.replace(config, **json.loads(chosen.read_text(encoding="utf-8"))["chosen"])
    settings = decoding(config, dev.type == "cuda")
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"peft-nlg {config.task} ({config.method}, {settings.search}); type 'quit' to end.\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip().lower() == "quit":
            break
        if not text.strip():
            if not interactive:
                stdout.write("\n")
            continue
        # the model sees one input at a time here; literal "\n" lets a dialogue context span turns
        (output,), _ = generate(loaded.model, loaded.tokenizer, loaded.prompter, [text.replace("\\n", "\n")],
                                settings, dev, dtype, show_progress=False)
        stdout.write(output.replace("\n", " ") + "\n")
        stdout.flush()
