"""Run configuration: typed fields, per-task and per-method defaults from YAML, command-line overrides.

Precedence, lowest first: the field defaults below, ``defaults/tasks.yaml[task]``,
``defaults/methods.yaml[method]``, a ``--preset``, then whatever the command line sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from peft_nlg.formatting import INSTRUCTION_TURNS
from peft_nlg.methods import get_method
from peft_nlg.models import EMBEDDED_MODEL
from peft_nlg.tasks import get_task

# Compiled blocks trained 1.8-1.9x as many tokens/s as eager mode on an H200 (LoRA, P-tuning, prompt tuning,
# IA3, 2026-11-27; prefix tuning and full fine-tuning did not gain, methods.py), about 80 ms saved per 30k-token
# step, after a one-time compilation of 8 s (prompt tuning) to 97 s (LoRA) with the compiler's disk cache cold;
# on the 2-core CPU 1.1x for 20-70 s. From 500 steps on a GPU, the saving (about 40 s) outweighs all but
# LoRA's cold compilation.
COMPILE_MIN_STEPS = 500


# Settings a test or inference command chooses on top of a trained run's saved configuration; none of them
# changes what training computes (the CLI offers them to test and inference, the grid ignores them when it
# compares a record's training settings with what it asks for)
DECODING_SETTINGS = frozenset({"search", "num_beams", "max_new_tokens", "no_repeat_ngram", "gen_batch_tokens",
                               "gen_max_batch_size", "temperature", "top_p", "greedy_loop", "decode_attention",
                               "merge_adapter"})
TEST_SETTINGS = frozenset({"max_test_examples", "test_file"})


@dataclass
class RunConfig:
    # what
    task: str = "translation"
    method: str = "lora"
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "model id or local path"})
    method_options: dict = field(default_factory=dict, metadata={"help": "peft config options, k=v,k=v"})
    data_dir: str = "data"
    output_dir: str = field(default="", metadata={"help": "default: runs/<task>/<method>"})
    seed: int = 0
    # training
    epochs: float = 3.0
    max_steps: int = field(default=0, metadata={"help": "train this many optimizer steps (0: --epochs decides)"})
    train_token_budget: int = field(default=0, metadata={"help": "stop after this many real tokens (0: no limit)"})
    train_examples: int = field(default=0, metadata={"help": "use a fixed random subset of the train split (0: all)"})
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    warmup_steps: int = field(default=0, metadata={"help": "learning-rate warm-up steps (0: --warmup-ratio decides)"})
    lr_schedule: str = field(default="linear", metadata={
        "help": "the learning rate after the warm-up: linear or cosine decay to 0, or constant",
        "choices": ("linear", "cosine", "constant")})
    batch_tokens: int = field(default=0, metadata={
        "help": "padded tokens per micro-batch (0: 2048 on CPU, 32768 on GPU)"})
    max_batch_size: int = field(default=0, metadata={"help": "examples per micro-batch at most (0: 64 CPU, 512 GPU)"})
    grad_accum: int = 1
    max_forward_tokens: int = field(default=0, metadata={
        "help": "padded tokens per forward and backward pass at most: a larger batch runs in row chunks whose "
                "gradients add up to the batch's (the same step up to rounding, less memory at once; 0: 4096 on "
                "CPU, no limit on GPU; a large number lifts the CPU's limit)"})
    max_grad_norm: float = 1.0
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs and on CPUs with AMX, else fp32), bf16 or fp32"})
    gradient_checkpointing: bool = False
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile each transformer block for training (unset: on a GPU for runs of at least "
                f"{COMPILE_MIN_STEPS} optimizer steps, where the one-time compilation pays, for every method but "
                "full fine-tuning and prefix tuning, which trained no faster compiled)"})
    cudnn_attention: bool = field(default=False, metadata={
        "help": "let attention use cuDNN's kernels (GPU; slow here: they are planned anew for each batch shape)"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: once per epoch)"})
    patience: int = field(default=3, metadata={"help": "early stopping: validations without improvement"})
    max_valid_examples: int = 500
    max_source_tokens: int = 256
    max_target_tokens: int = 128
    instruction: str = field(default="", metadata={
        "help": "what decoder-only models are told to do (empty: the task's own instruction)"})
    instruction_turn: str = field(default="auto", metadata={
        "help": "decoder-only chat models: the instruction as its own system turn, or on the line before the "
                "source in the user turn; auto: system, or user where the chat template has no system role",
        "choices": INSTRUCTION_TURNS})
    # test / inference
    search: str = field(default="greedy", metadata={
        "help": "greedy, beam, sample, or auto (test: the task's decoding search on the validation split picks; "
                "inference: what test --search auto picked for this run)",
        "choices": ("greedy", "beam", "sample", "auto")})
    num_beams: int = 4
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (--search sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus size (--search sample; 1: off)"})
    max_new_tokens: int = field(default=0, metadata={"help": "0: the task's default"})
    no_repeat_ngram: int = field(default=0, metadata={
        "help": "never repeat an n-gram of this size within one output (0: off; the dialogue task uses 3)"})
    max_test_examples: int = field(default=0, metadata={"help": "score only the first N test examples (0: all)"})
    test_file: str = field(default="", metadata={"help": "score this JSONL of src/trg instead of the test split"})
    gen_batch_tokens: int = field(default=0, metadata={
        "help": "prompt + new tokens per generation batch (0: on CPU as many as a 1.5 GB key/value cache holds, "
                "at most 65536; 262144 on GPU)"})
    gen_max_batch_size: int = field(default=0, metadata={
        "help": "sequences per generation batch (0: 256 CPU, 1024 GPU)"})
    greedy_loop: str = field(default="auto", metadata={
        "help": "decoding code: ours (greedy: the same tokens, cheaper steps; beam search: each prompt prefilled "
                "once for all its beams) or transformers'; auto: ours on a CPU, where it was measured",
        "choices": ("auto", "ours", "transformers")})
    decode_attention: str = field(default="auto", metadata={
        "help": "attention of each decoding step where our greedy loop runs on a CPU: kernel (ours, in C, built on "
                "first use; bf16 on CPUs with AVX512-BF16; fp32 scores as SDPA's), products (two batched products "
                "over the cache, scores rounded to the compute dtype as in eager attention) or sdpa (torch's kernel, "
                "fp32 scores); auto: the kernel where it runs, else products in batches of 128 rows or more",
        "choices": ("auto", "kernel", "products", "sdpa")})
    merge_adapter: str = field(default="auto", metadata={
        "help": "test and inference: fold a LoRA or IA3 adapter into the base weights (the same function, one "
                "product per layer instead of two paths, faster); auto: when the folded weights keep the adapter's "
                "update to within 5% (bf16 weights lose updates below their resolution; measured at load time)",
        "choices": ("auto", "yes", "no")})
    # housekeeping
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted training run"})
    save_checkpoints: bool = field(default=True, metadata={
        "help": "keep checkpoint/ (weights + optimizer) at each validation, for --resume"})
    trust_remote_code: bool = False
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard or none"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    profile_steps: int = field(default=0, metadata={
        "help": "profile this many training steps after 5 warm-up steps (torch.profiler; writes profile.txt)"})

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be {', '.join(choices)}, not {getattr(self, f.name)!r}")

    def resolved_sizes(self, on_gpu: bool) -> dict:
        """Batch sizes with 0 ("auto") replaced by a sensible value for the device.

        CPU training: SmolLM2-135M with LoRA ran at 95-102 tokens/s with 512 to 4,096 tokens per step on the
        2-core machine (compute-bound), while peak memory went from 3.0 to 14.2 GB; 2,048 (7.6 GB) keeps the
        memory moderate and the step large enough for small models, where per-step overhead shows.
        """
        auto = {"batch_tokens": (2048, 32768), "max_batch_size": (64, 512),
                # CPU generation: 0 leaves the token budget to the model's key/value size (generation.CACHE_BYTES)
                "gen_batch_tokens": (0, 262144), "gen_max_batch_size": (256, 1024),
                # a CPU machine has a fraction of a GPU's memory: full fine-tuning of SmolLM2-135M on 16k-token
                # batches (the study's) went past the 2-core machine's 24 GB and was killed (0 on GPU: no limit)
                "max_forward_tokens": (4096, 0)}
        return {name: getattr(self, name) or choices[on_gpu] for name, choices in auto.items()}

    @property
    def out(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.task / self.method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # the original study's model per task (data: `peft-nlg setup --source hub`)
    "original": lambda task: {"model": get_task(task).original_model},
}


def yaml_defaults(name: str) -> dict:
    text = resources.files("peft_nlg").joinpath("defaults", name).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def field_names() -> set[str]:
    return {f.name for f in fields(RunConfig)}


def check_keys(values: dict, where: str) -> None:
    unknown = set(values) - field_names()
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")


def build_config(overrides: dict[str, Any], preset: str | None = None) -> RunConfig:
    """Resolve a run configuration from the layered defaults and the given overrides."""
    task = overrides.get("task", RunConfig.task)
    method = get_method(overrides.get("method", RunConfig.method)).name
    get_task(task)  # fail early on an unknown task
    merged: dict[str, Any] = {}
    for where, layer in ((f"defaults/tasks.yaml:{task}", yaml_defaults("tasks.yaml").get(task, {})),
                         (f"defaults/methods.yaml:{method}", yaml_defaults("methods.yaml").get(method, {}))):
        check_keys(layer, where)
        for key, value in layer.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
        merged.update(PRESETS[preset](task))
    check_keys(overrides, "command line")
    for key, value in overrides.items():
        merged[key] = {**merged.get(key, {}), **value} if key == "method_options" else value
    merged.update(task=task, method=method)
    return RunConfig(**merged)


def save_config(config: RunConfig, path: Path) -> None:
    from peft_nlg.data.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def load_config_file(path: Path) -> RunConfig:
    values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    check_keys(values, str(path))
    try:
        return RunConfig(**values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
