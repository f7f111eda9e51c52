"""Everything a run shares between train, test and inference: device, precision, loading the pieces."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import random
import resource
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.attention import SDPBackend, sdpa_kernel

from peft_nlg.config import RunConfig
from peft_nlg.formatting import Prompter
from peft_nlg.methods import Method, MethodContext, get_method
from peft_nlg.models import (
    ModelFamily,
    family_of,
    freeze_fixed_tables,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from peft_nlg.tasks import get_task
from peft_nlg.tasks.base import Task

ADAPTER_CONFIG = "adapter_config.json"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# cuDNN's attention builds an execution plan on the host for each new tensor shape. Length-grouped batches and
# a decode cache that grows by one token per step give attention a new shape nearly every step: in the H200
# grid's profile (2026-11-26, benchmarks/results/profiles/) cuDNN attention took 1.3-1.7 ms of host time per
# call, about 86 ms of each profiled training step, while its kernels ran 0.06-0.18 ms. Flash and
# memory-efficient attention launch without per-shape setup.
_ATTENTION_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(allow_cudnn: bool):
    """A context in which scaled-dot-product attention picks from flash, memory-efficient and math kernels,
    or, with ``allow_cudnn``, from torch's default list (cuDNN first on recent cards)."""
    return contextlib.nullcontext() if allow_cudnn else sdpa_kernel(_ATTENTION_WITHOUT_CUDNN)


def attention_kernel_names(allow_cudnn: bool) -> str:
    """What records say about the attention kernels a run could use."""
    return "torch default (cuDNN allowed)" if allow_cudnn else "flash, efficient, math (no cuDNN)"


CPU_BF16_ATTENTION = "peft_nlg_sdpa_fp32"


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with its inputs in fp32: under bf16 autocast on a CPU, torch's flash
    kernel is slow in bf16 at short sequences (backward 52 ms a call against 8 ms in fp32 for the study's
    translation batches on the 2-core CPU), while the matrix products around it gain most from bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp32(tensor):  # additive masks and T5's position bias too
        return tensor.float() if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else tensor

    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, fp32(query), fp32(key), fp32(value), fp32(attention_mask),
                                                 **{name: fp32(v) for name, v in kwargs.items()})
    return output.to(query.dtype), weights


def use_fp32_attention_on_cpu(model: torch.nn.Module, dev: torch.device, dtype: torch.dtype) -> None:
    """For bf16 training on a CPU, models on transformers' SDPA attention compute attention in fp32
    (``_sdpa_in_fp32``); models with their own attention code are left alone. The setting is not saved."""
    if dev.type != "cpu" or dtype != torch.bfloat16 or getattr(model.config, "_attn_implementation", "") != "sdpa":
        return
    register_fp32_attention()
    model.set_attn_implementation(CPU_BF16_ATTENTION)


def register_fp32_attention() -> None:
    """Register ``_sdpa_in_fp32`` with transformers under ``CPU_BF16_ATTENTION``, with SDPA's mask builder:
    transformers gives an attention function registered without one no mask at all, so padding was attended
    to (T5) and prefix tuning's virtual tokens were cut off by the causal-only path (until 2026-11-28)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CPU_BF16_ATTENTION, _sdpa_in_fp32)
    AttentionMaskInterface.register(CPU_BF16_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def compute_dtype(config: RunConfig, dev: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (autocast over fp32 trainable weights), else fp32."""
    if config.precision == "fp32":
        return torch.float32
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, not '{config.precision}'")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX (Intel Xeon Sapphire Rapids and later; bf16
    about 4x fp32 on a 2-core development machine) or AVX-512 BF16 (AMD Zen 4 EPYC and others; our full
    fine-tuning of SmolLM2-135M trained 1.7-1.8x faster in bf16 than in fp32 on a 2-core one, 2026-12-06).
    Elsewhere bf16 is emulated (an earlier development machine without either ran it far slower than fp32),
    so fp32 stays."""
    return cpu_has_amx() or cpu_has_avx512_bf16()


def cpu_has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_has_avx512_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def base_weight_dtype(method: Method, dtype: torch.dtype) -> torch.dtype:
    # frozen weights never see an optimizer, so with PEFT they can live in the compute dtype;
    # full fine-tuning keeps fp32 master weights
    return dtype if method.is_peft else torch.float32


def skip_adapter_input_casts(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Under bf16 autocast, adapter layers (LoRA's) need not cast their bf16 input up to their fp32 weights'
    dtype: autocast casts it straight back down for the matrix product, so the round trip changes no number
    (with dropout 0; with dropout the mask is drawn on the bf16 input) and costs about four kernels per adapted
    layer and step (834 of the 7,448 ops, views apart, of a forward and backward pass of the study's LoRA on
    SmolLM2-135M, counted on the CPU by benchmarks/activation_memory.py; the GPU launches a kernel for each).
    Every forward pass of this tool runs under autocast when ``dtype`` is bf16; one that did not would fail on
    mixed dtypes."""
    if dtype != torch.float32:
        set_adapter_input_casts(model, False)


def set_adapter_input_casts(model: torch.nn.Module, enabled: bool) -> None:
    """peft's own switch (as in peft.helpers.disable_input_dtype_casting), on every adapter layer."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


@dataclass
class Loaded:
    task: Task
    method: Method
    family: ModelFamily
    model_path: str
    model: torch.nn.Module
    tokenizer: object
    prompter: Prompter
    adapter_merged: bool = False  # test and inference: the adapter folded into the base weights
    fold_error: float | None = None  # what folding would lose of the adapter's weight update (fold_error)


def _load_pieces(config: RunConfig, method: Method, model_path: str, tokenizer_path: str,
                 weights_dtype: torch.dtype) -> Loaded:
    """Config -> family -> tokenizer -> model -> prompter: the steps every mode shares (model on the CPU)."""
    task = get_task(config.task)
    model_config = load_config(model_path, config.trust_remote_code)
    family = family_of(model_config)
    tokenizer = load_tokenizer(tokenizer_path, family, config.trust_remote_code)
    model = load_model(model_path, family, weights_dtype, config.trust_remote_code)
    prompter = Prompter.create(task, family, tokenizer, model_config, config.max_source_tokens,
                               config.max_target_tokens, config.instruction, config.instruction_turn)
    return Loaded(task, method, family, model_path, model, tokenizer, prompter)


def _inference_dtype(dev: torch.device, dtype: torch.dtype) -> torch.dtype:
    return dtype if dev.type == "cuda" or cpu_has_fast_bf16() else torch.float32


def load_for_training(config: RunConfig, dev: torch.device, dtype: torch.dtype) -> Loaded:
    method = get_method(config.method)
    model_path = resolve_model_path(config.model)
    loaded = _load_pieces(config, method, model_path, model_path, base_weight_dtype(method, dtype))
    model = loaded.model
    freeze_fixed_tables(model)
    use_fp32_attention_on_cpu(model, dev, dtype)
    context = MethodContext(loaded.family, model, model_path, loaded.prompter.instruction)
    peft_config = method.peft_config(context, config.method_options)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
        if method.initialize is not None:
            method.initialize(model, context, config.method_options)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable weights stay fp32 for the optimizer
        skip_adapter_input_casts(model, dtype)
        method.ready_for_generation(model)
    loaded.model = model.to(dev)
    return loaded


def load_trained(run_dir: Path, config: RunConfig, dev: torch.device, dtype: torch.dtype) -> Loaded:
    """Load a finished run's model: an adapter over its base model, or a fully fine-tuned model."""
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no trained model; run `peft-nlg train` first")
    method = get_method(config.method)
    is_adapter = (model_dir / ADAPTER_CONFIG).is_file()
    model_path = resolve_model_path(config.model) if is_adapter else str(model_dir)
    loaded = _load_pieces(config, method, model_path, str(model_dir), _inference_dtype(dev, dtype))
    if is_adapter:
        loaded.model = method.ready_for_generation(PeftModel.from_pretrained(loaded.model, str(model_dir)))
        skip_adapter_input_casts(loaded.model, dtype)
        fold_adapter_for_generation(loaded, config.merge_adapter)
    loaded.model = loaded.model.to(dev).eval()
    return loaded


# --merge-adapter auto folds when the folded weights keep the adapter's update to within this relative error.
# Measured on two LoRA adapters of the real model (translation, bf16, 2026-11-27): README command 1's (200
# examples at the default rate) lost 73% of its update to bf16's resolution and chrF fell from 14.12 to 12.51;
# one trained at the study's rate on 250k tokens lost 1.6%, and its 200 test translations scored chrF 19.90
# folded against 20.05 as loaded and 20.12 in fp32. The threshold lies between the two; it is not calibrated
# further.
FOLD_TOLERANCE = 0.05


def fold_error(model: torch.nn.Module) -> float:
    """The relative error (norm over every adapted layer) of the weight update that folding the adapter into
    the base weights, in their dtype, would keep, against the exact update.

    Each adapted layer is copied, folded in fp32 (exact up to fp32 rounding), and the folded weight rounded to
    the base weights' dtype: an update smaller than half a rounding step of its weight is lost there. 0 for
    fp32 weights up to rounding, and for an adapter that changes nothing yet (LoRA's B = 0).
    """
    lost = update = 0.0
    for layer in model.modules():
        if not isinstance(layer, BaseTunerLayer) or not layer.active_adapters:
            continue
        weight = layer.get_base_layer().weight.detach()
        exact = copy.deepcopy(layer).float()
        exact.merge()
        folded = exact.get_base_layer().weight.detach()
        change = folded - weight.float()                          # the adapter's exact update
        kept = folded.to(weight.dtype).float() - weight.float()   # what weights of their own dtype keep of it
        lost += float((kept - change).pow(2).sum())
        update += float(change.pow(2).sum())
    return (lost / update) ** 0.5 if update else 0.0


def layers_sharing_adapted_weights(model: torch.nn.Module) -> list[str]:
    """Adapted layers whose base weight another module also holds, as tied input and output embeddings do.

    Folding writes the update into that one shared tensor, so it also changes the module the adapter did not
    adapt, or adds the update twice where both are adapted (peft's ``merge_and_unload`` does either silently;
    logits of a tiny tied model moved by 255 after folding a LoRA on its embeddings): such an adapter generates
    as loaded."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    return sorted(name for name, layer in model.named_modules()
                  if isinstance(layer, BaseTunerLayer) and layer.active_adapters
                  and len(holders.get(id(getattr(layer.get_base_layer(), "weight", None)), [])) > 1)


def fold_adapter_for_generation(loaded: Loaded, setting: str) -> Loaded:
    """``--merge-adapter``: fold a LoRA or IA3 adapter into the base weights before generating.

    Generation then runs the base model's layers alone, without the adapter's extra products and additions in
    every layer: a 30-layer model's greedy decoding with LoRA went from 267 to 412 new tokens/s on the 2-core
    CPU (docs/benchmarks.md). In fp32 the outputs are the same. A bf16 weight keeps about 3 significant digits,
    so an update smaller than half a rounding step of the base weight is lost: ``auto`` measures that loss
    (``fold_error``) and folds only within ``FOLD_TOLERANCE``; ``yes`` folds anyway, except where an adapted
    weight is shared with another module (``layers_sharing_adapted_weights``), which folding would corrupt.
    The model is no longer trainable afterwards: this is for test and inference only.
    """
    if setting not in ("auto", "yes", "no"):
        raise ValueError(f"merge_adapter must be auto, yes or no, not '{setting}'")
    if setting == "no" or not loaded.method.merges_into_base or not isinstance(loaded.model, PeftModel):
        return loaded
    shared = layers_sharing_adapted_weights(loaded.model)
    if shared:
        if setting == "yes":
            raise ValueError(f"cannot fold the adapter: the weight of its layer {shared[0]} is shared with another "
                             "module (tied embeddings), so folding would change that module too; use --merge-adapter "
                             "no")
        return loaded
    loaded.fold_error = round(fold_error(loaded.model), 4)
    if setting == "yes" or loaded.fold_error <= FOLD_TOLERANCE:
        loaded.model = loaded.model.merge_and_unload()
        loaded.adapter_merged = True
    return loaded


def load_base(config: RunConfig, dev: torch.device, dtype: torch.dtype) -> Loaded:
    """The untrained base model (the zero-shot floor)."""
    model_path = resolve_model_path(config.model)
    loaded = _load_pieces(config, get_method("none"), model_path, model_path, _inference_dtype(dev, dtype))
    loaded.model = loaded.model.to(dev).eval()
    return loaded


def _resident_peak_kb() -> int:
    """The process's peak resident memory since the last reset (Linux VmHWM), else its lifetime maximum."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_gb(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
                "peak_memory_kind": "cuda max allocated"}
    return {"peak_memory_gb": round(_resident_peak_kb() / 2**20, 3), "peak_memory_kind": "process max RSS (CPU)"}


def reset_peak_memory(dev: torch.device) -> None:
    """Start measuring from now: in a grid one process runs many models, and each record must hold its own."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:  # Linux resets the peak resident set size when "5" is written here
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def release_device_memory() -> None:
    """Drop the last run's model and hand cached GPU memory back, for the next run and for other processes."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_busy_seconds(events) -> float:
    """Seconds the device itself spent running kernels and copies, from a profiler's ``key_averages()``. Only
    the device's own rows count: an op row (``aten::mm``) carries the time of the kernels it launched, and a
    step annotation (``ProfilerStep*``) the span of the step on the device, idle gaps included, so summing every
    row counts each kernel two or three times."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
               and not e.key.startswith("ProfilerStep")) / 1e6


class StepProfiler:
    """torch.profiler over ``active`` training steps after ``wait`` (+1 warm-up) steps; writes an op table and
    how busy the device was. Where a small model's step time goes (host launching kernels, or the device)."""

    def __init__(self, dev: torch.device, active: int, path: Path, wait: int = 5):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.dev, self.path, self.active, self.wait = dev, path, active, wait
        self.step_number, self.started = 0, None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        self.profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active),
                                on_trace_ready=self._write)
        self.profiler.start()

    def step(self) -> None:
        synchronize(self.dev)
        self.step_number += 1
        if self.step_number == self.wait + 1:  # the active steps start after this one
            self.started = time.perf_counter()
        self.profiler.step()

    def _write(self, profiler) -> None:
        wall = time.perf_counter() - self.started if self.started else float("nan")
        events = profiler.key_averages()
        on_device = device_busy_seconds(events) if self.dev.type == "cuda" else 0.0
        sort = "self_cuda_time_total" if self.dev.type == "cuda" else "self_cpu_time_total"
        busy = f"device kernels {on_device:.3f} s ({100 * on_device / wall:.0f}% of wall); " if on_device else ""
        summary = (f"{self.active} steps in {wall:.3f} s wall ({wall / self.active * 1000:.1f} ms per step); {busy}"
                   "the profiler's own overhead is in the wall time\n")
        self.path.write_text(summary + events.table(sort_by=sort, row_limit=40), encoding="utf-8")

    def stop(self) -> None:
        self.profiler.stop()


def cpu_model() -> str | None:
    """The CPU's name as Linux gives it (``model name`` in /proc/cpuinfo), or None elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def hardware(dev: torch.device) -> dict:
    # which CPU matters for every CPU number: the development machines here have been a Xeon with AMX, an
    # AVX2-only AMD EPYC and an AVX-512 EPYC with bf16 instructions, with different defaults and speeds
    info = {"device": dev.type, "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_amx": cpu_has_amx(),
            "cpu_avx512_bf16": cpu_has_avx512_bf16(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def package_versions() -> dict:
    names = ["torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu", "rouge-score"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def command_line() -> str:
    """How this process was started, as a shell line (records carry it so a run can be repeated)."""
    return shlex.join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
