"""Training, top to bottom: load, encode, batch, optimise, validate, keep the best, resume when asked.

Runs on one CPU or GPU as is, and under ``accelerate launch`` / ``torchrun`` through ``Accelerator``.
Outputs in the run directory:
  config.yaml            the effective configuration
  model/                 the best checkpoint in ``save_pretrained`` layout (adapter, or full model)
  checkpoint/            the latest state for ``--resume`` (weights, optimizer, progress)
  logs/                  TensorBoard event files
  train_record.json      parameters, time, tokens/s, peak memory, losses
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from peft_nlg.batching import split_for_memory, token_budget_batches, training_batch
from peft_nlg.config import COMPILE_MIN_STEPS, RunConfig, save_config
from peft_nlg.data.io import read_pairs, write_json
from peft_nlg.data.splits import fingerprint
from peft_nlg.loss import summed_loss
from peft_nlg.methods import Method
from peft_nlg.models import compile_repeated_layers, count_parameters
from peft_nlg.runtime import (
    StepProfiler,
    attention_kernel_names,
    attention_kernels,
    command_line,
    compute_dtype,
    device,
    dir_size_bytes,
    hardware,
    load_for_training,
    now_iso,
    package_versions,
    peak_memory_gb,
    reset_peak_memory,
    set_seed,
    synchronize,
)


class RunExistsError(RuntimeError):
    pass


def split_path(config: RunConfig, split: str) -> Path:
    return Path(config.data_dir) / config.task / f"{split}.jsonl"


def subset(examples: list[dict], n: int, seed: int) -> list[dict]:
    """A fixed random subset, the same for every method (the data-size ladder)."""
    if not n or n >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(examples), generator=generator)[:n].tolist())
    return [examples[i] for i in keep]


def _trained_on(config: RunConfig, train: list, valid: list) -> tuple[list, list]:
    """Of a run's two splits (examples or their features, in file order), what it trains and validates on."""
    return subset(train, config.train_examples, config.seed), valid[: config.max_valid_examples]


_FINGERPRINTS: dict[tuple, dict[str, str]] = {}


def data_fingerprints(config: RunConfig) -> dict[str, str]:
    """The ``data_fingerprints`` a run of ``config`` would record, from its files as they are now (the grid
    compares them with a record's before reusing it)."""
    paths = [split_path(config, split) for split in ("train", "valid")]
    key = (*((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths),
           config.train_examples, config.seed, config.max_valid_examples)
    if key not in _FINGERPRINTS:
        train_rows, valid_rows = _trained_on(config, *(read_pairs(p) for p in paths))
        _FINGERPRINTS[key] = {"train": fingerprint(train_rows), "valid": fingerprint(valid_rows)}
    return _FINGERPRINTS[key]


_ENCODED: dict[tuple, tuple[list[dict], list[dict]]] = {}


def encoded_split(config: RunConfig, prompter, split: str) -> tuple[list[dict], list[dict]]:
    """A split's examples and their token ids; kept for the process, so a grid reads and encodes each split
    once, not once per run."""
    path = split_path(config, split)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, prompter.tokenizer.name_or_path,
           prompter.family.name, prompter.prefix, config.max_source_tokens, config.max_target_tokens)
    if key not in _ENCODED:
        if len(_ENCODED) >= 6:
            _ENCODED.pop(next(iter(_ENCODED)))
        examples = read_pairs(path)
        _ENCODED[key] = examples, prompter.encode_many(examples)
    return _ENCODED[key]


def _prepare_run_dir(config: RunConfig) -> bool:
    """Create the run directory; returns True when resuming. Never replaces results silently."""
    out = config.out
    has_results = (out / "model").exists() or (out / "checkpoint").exists()
    if has_results and config.resume:
        return (out / "checkpoint" / "state.json").is_file()
    if has_results and not config.overwrite:
        raise RunExistsError(f"{out}: holds an earlier run; pass --resume to continue it or --overwrite to replace it")
    if has_results:
        for name in ("model", "checkpoint", "logs", "train_record.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of the trained weights (a copy even on the CPU, where ``.cpu()`` would share storage)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def _save_checkpoint(out: Path, model, optimizer, scheduler, state: dict) -> None:
    """Latest state for resuming: trainable weights (safetensors), optimizer tensors, progress."""
    tmp = out / "checkpoint.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    # optimizer state holds only tensors and numbers; read back with weights_only=True (no pickled code)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    final = out / "checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _load_checkpoint(out: Path, model, optimizer, scheduler) -> dict:
    ckpt = out / "checkpoint"
    _load_trainable(model, load_file(str(ckpt / "trainable.safetensors")))
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return json.loads((ckpt / "state.json").read_text())


def _load_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))


def _save_best(out: Path, model, tokenizer) -> None:
    tmp, final = out / "model.partial", out / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def learning_rate_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's multiple at optimizer step ``step`` (from 0): a linear warm-up over ``warmup`` steps
    (the first step already moves), then ``schedule`` ("linear" or "cosine" down towards 0 at ``total``,
    or "constant")."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return {"linear": 1.0 - done, "cosine": 0.5 * (1.0 + math.cos(math.pi * done)), "constant": 1.0}[schedule]


def steady_rate(step_times: list[list[float]]) -> float:
    """Tokens/s after the first steps (allocator warm-up, kernel selection), as benchmarks report it."""
    skip = min(10, len(step_times) // 5)
    timed = step_times[skip:] or step_times
    return round(sum(n for _, n in timed) / max(sum(t for t, _ in timed), 1e-9), 1)


@torch.no_grad()
def validation_loss(model, batches, is_encoder_decoder: bool, accelerator: Accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch, _, _ in batches:
        with accelerator.autocast():
            loss, n = summed_loss(model, batch, is_encoder_decoder)
        total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def _accelerator(dev: torch.device, dtype: torch.dtype) -> Accelerator:
    mixed_precision = "bf16" if dtype == torch.bfloat16 else "no"
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != mixed_precision:
        # accelerate keeps one precision per process and refuses another; a later run in the same process (a
        # script, a test suite) may ask for one. The process-wide device setup (PartialState) stays.
        AcceleratorState._reset_state()
    return Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision)


def use_compiled_blocks(config: RunConfig, method: Method, dev: torch.device, steps: int) -> tuple[bool, str]:
    """Whether training compiles the transformer blocks, and why (printed and recorded)."""
    if not method.supports_compiled_blocks:
        return False, f"{method.name}'s blocks cannot share one compiled graph"
    if config.compile is not None:
        return config.compile, "--compile" if config.compile else "--no-compile"
    if dev.type != "cuda":
        return False, "default: not on a CPU"
    if steps < COMPILE_MIN_STEPS:
        return False, f"default: {steps} steps, fewer than the {COMPILE_MIN_STEPS} where compiling pays"
    if method.eager_by_default:
        return False, f"default: {method.eager_by_default}"
    return True, f"default: {steps} steps on a GPU"


def train(config: RunConfig) -> dict:
    with attention_kernels(config.cudnn_attention):
        return _train(config)


def _train(config: RunConfig) -> dict:
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    resuming = _prepare_run_dir(config)
    out = config.out
    save_config(config, out / "config.yaml")

    dev = device()
    dtype = compute_dtype(config, dev)
    accelerator = _accelerator(dev, dtype)
    dev = accelerator.device
    loaded = load_for_training(config, dev, dtype)
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    if config.gradient_checkpointing and loaded.method.supports_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    sizes = config.resolved_sizes(dev.type == "cuda")

    # data: encode once, then cut length-grouped batches under the token budget
    (train_examples, train_features), (valid_examples, valid_features) = (
        encoded_split(config, loaded.prompter, split) for split in ("train", "valid"))
    train_examples, valid_examples = _trained_on(config, train_examples, valid_examples)
    train_features, valid_features = _trained_on(config, train_features, valid_features)
    # of the exact examples used, so a record says which data it came from
    fingerprints = {"train": fingerprint(train_examples), "valid": fingerprint(valid_examples)}

    def lengths(features):
        return [len(f["input_ids"]) + (len(f["labels"]) if family.is_encoder_decoder else 0) for f in features]

    def to_batches(features, indices) -> list[tuple[dict, int, int]]:
        """(batch on the device, target tokens, real tokens) per micro-batch; copies don't block the host."""
        prepared = []
        for idx in indices:
            batch, n_targets, n_real = training_batch([features[i] for i in idx], tokenizer.pad_token_id,
                                                      family.is_encoder_decoder)
            if dev.type == "cuda":
                batch = {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}
            prepared.append((batch, n_targets, n_real))
        return prepared

    valid_batches = to_batches(valid_features, token_budget_batches(
        lengths(valid_features), sizes["batch_tokens"], sizes["max_batch_size"]))

    train_lengths = lengths(train_features)

    def epoch_plan(epoch: int) -> list[list[int]]:  # seeded per epoch, so a resumed run replays the same order
        return token_budget_batches(train_lengths, sizes["batch_tokens"], sizes["max_batch_size"],
                                    shuffle=True, seed=config.seed + epoch)

    steps_per_epoch = math.ceil(len(epoch_plan(0)) / config.grad_accum)
    total_steps = config.max_steps or math.ceil(steps_per_epoch * config.epochs)
    if config.train_token_budget and not config.max_steps:
        # the schedule must end where the budget does: estimate the steps the budget buys
        tokens_per_epoch = sum(train_lengths)
        total_steps = min(total_steps, math.ceil(config.train_token_budget * steps_per_epoch / tokens_per_epoch))
    eval_every = config.eval_every or steps_per_epoch
    compiled, compile_reason = use_compiled_blocks(config, loaded.method, dev, total_steps)
    if compiled and not compile_repeated_layers(model):
        compiled, compile_reason = False, "the model has no transformer blocks that torch.compile could take"
    accelerator.print(f"compiled blocks: {'on' if compiled else 'off'} ({compile_reason})")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, fused=dev.type == "cuda")
    warmup = config.warmup_steps or max(1, int(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(learning_rate_factor, warmup=warmup, total=total_steps,
                                     schedule=config.lr_schedule))
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "best_valid_loss": None,
             "bad_validations": 0, "train_seconds": 0.0, "history": [], "step_times": []}
    if resuming:
        state = _load_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler)
        accelerator.print(f"resuming {out} at step {state['step']}")

    writer = None
    if config.report_to == "tensorboard" and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "logs"))

    reset_peak_memory(dev)
    model.train()
    progress = tqdm(total=total_steps, initial=state["step"], desc=f"train {config.task}/{config.method}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    stop = state["step"] >= total_steps
    # without checkpoints nothing can resume, so the best weights wait in host memory and reach the disk once,
    # at the end, not at every improvement (0.5 GB for full fine-tuning; small-data runs improve at most
    # of their many validations)
    best_in_memory = None
    profiler = StepProfiler(dev, config.profile_steps, out / "profile.txt") if config.profile_steps else None
    window_loss, window_count = torch.zeros((), device=dev), 0
    while not stop:
        plan = epoch_plan(state["epoch"])
        steps = [[rows for batch in plan[i:i + config.grad_accum]
                  for rows in split_for_memory(batch, train_lengths, sizes["max_forward_tokens"])]
                 for i in range(0, len(plan), config.grad_accum)]
        upcoming = None
        for index in range(state["batch_in_epoch"], len(steps)):
            synchronize(dev)
            started = time.perf_counter()
            batches = upcoming or to_batches(train_features, steps[index])
            n_targets = sum(n for _, n, _ in batches)
            step_tokens = sum(n for _, _, n in batches)
            step_loss = torch.zeros((), device=dev)
            for batch, _, _ in batches:
                with accelerator.autocast():
                    loss, _ = summed_loss(model, batch, family.is_encoder_decoder)
                accelerator.backward(loss / n_targets)  # mean over every target token in the step
                step_loss += loss.detach()
            state["tokens"] += step_tokens
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # the host pads and copies the next step's batches while the device is still on this one
            upcoming = to_batches(train_features, steps[index + 1]) if index + 1 < len(steps) else None
            synchronize(dev)
            state["train_seconds"] += time.perf_counter() - started
            state["step_times"].append([round(time.perf_counter() - started, 5), step_tokens])
            state["step"] += 1
            state["batch_in_epoch"] += 1
            window_loss, window_count = window_loss + step_loss, window_count + n_targets
            progress.update(1)
            if profiler:
                profiler.step()
            if writer and state["step"] % 10 == 0:
                writer.add_scalar("train/loss", float(window_loss) / window_count, state["step"])
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], state["step"])
                writer.add_scalar("train/tokens_per_s", state["tokens"] / state["train_seconds"], state["step"])
            if state["step"] % 10 == 0:  # reading the loss waits for the GPU: not every step
                progress.set_postfix(loss=f"{float(step_loss) / n_targets:.3f}")
            budget_spent = config.train_token_budget and state["tokens"] >= config.train_token_budget
            stop = state["step"] >= total_steps or bool(budget_spent)
            if state["step"] % eval_every == 0 or stop:
                vloss = validation_loss(model, valid_batches, family.is_encoder_decoder, accelerator)
                train_loss = float(window_loss) / max(window_count, 1)
                window_loss, window_count = torch.zeros((), device=dev), 0
                state["history"].append({"step": state["step"], "train_loss": round(train_loss, 4),
                                         "valid_loss": round(vloss, 4), "tokens": state["tokens"]})
                if writer:
                    writer.add_scalar("valid/loss", vloss, state["step"])
                improved = state["best_valid_loss"] is None or vloss < state["best_valid_loss"]
                if improved:
                    state["best_valid_loss"], state["best_step"], state["bad_validations"] = vloss, state["step"], 0
                    if not config.save_checkpoints:
                        best_in_memory = _trainable_state(accelerator.unwrap_model(model))
                    elif accelerator.is_main_process:  # beside each checkpoint, for --resume
                        _save_best(out, accelerator.unwrap_model(model), tokenizer)
                else:
                    state["bad_validations"] += 1
                    stop = stop or state["bad_validations"] >= config.patience
                tqdm.write(f"step {state['step']}: train loss {train_loss:.4f}, valid loss {vloss:.4f}"
                           + ("" if improved else f" (no improvement {state['bad_validations']}/{config.patience})"))
                if accelerator.is_main_process and config.save_checkpoints:
                    _save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, state)
            if stop:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    if profiler:
        profiler.stop()
    if best_in_memory is not None and accelerator.is_main_process:
        _load_trainable(accelerator.unwrap_model(model), best_in_memory)  # training is over: the model may change
        _save_best(out, accelerator.unwrap_model(model), tokenizer)
    if writer:
        writer.close()

    record = {
        "kind": "train", "finished_at": now_iso(), "task": config.task, "method": config.method,
        "model": config.model, "family": family.name,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "steps": state["step"], "epochs_done": state["epoch"] + state["batch_in_epoch"] / max(1, len(steps)),
        "train_examples": len(train_features), "train_tokens": state["tokens"],
        "train_seconds": round(state["train_seconds"], 2),
        "train_tokens_per_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "steady_tokens_per_s": steady_rate(state["step_times"]), "step_times": state["step_times"],
        "best_valid_loss": state["best_valid_loss"], "best_step": state.get("best_step"),
        "history": state["history"], "compute_dtype": str(dtype).removeprefix("torch."),
        "attention_kernels": attention_kernel_names(config.cudnn_attention),
        "compiled": compiled, "compiled_reason": compile_reason,
        "batch_sizes": sizes,  # as resolved for this device (the configuration's 0 means "auto")
        **peak_memory_gb(dev),
        "model_size_bytes": dir_size_bytes(out / "model"),
        "data_fingerprints": fingerprints,
        "hardware": hardware(dev), "versions": package_versions(), "seed": config.seed,
        "config": config.to_dict(), "command": command_line(),
    }
    if accelerator.is_main_process:
        write_json(out / "train_record.json", record)
    return record
