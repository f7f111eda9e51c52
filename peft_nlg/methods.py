"""The training-method registry: one entry per method, each returning a ``peft`` config for a model.

Every method-specific decision lives in this file. Defaults for each method's options come from
``defaults/methods.yaml`` and can be overridden per run (``--method-options r=16,lora_alpha=32``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from peft_nlg.models import ModelFamily

# Module names of the attention key/value projections and of the feed-forward output layer, per naming
# scheme. peft ships IA3 defaults for T5 and Llama but none for Marian or BlenderbotSmall (BART-style
# names), so the scheme is recognised from the layers the model actually has.
_NAMING_SCHEMES = (
    {"marker": "down_proj", "key_value": ["k_proj", "v_proj"], "ff_out": ["down_proj"]},  # Llama-style
    {"marker": "fc2", "key_value": ["k_proj", "v_proj"], "ff_out": ["fc2"]},             # BART/Marian-style
    {"marker": "wo", "key_value": ["k", "v"], "ff_out": ["wo"]},                         # T5-style
)


@dataclass(frozen=True)
class MethodContext:
    family: ModelFamily
    model: torch.nn.Module
    model_path: str        # prompt tuning reads its tokenizer from here for text initialisation
    instruction: str       # task instruction, used to initialise soft prompts


def _linear_leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def naming_scheme(model: torch.nn.Module) -> dict:
    names = _linear_leaf_names(model)
    for scheme in _NAMING_SCHEMES:
        if scheme["marker"] in names and set(scheme["key_value"]) <= names:
            return scheme
    raise ValueError(f"cannot find attention/feed-forward layers to adapt among {sorted(names)}; "
                     "pass explicit target_modules in --method-options")


def _lora(ctx: MethodContext, opts: dict) -> LoraConfig:
    opts = dict(opts)
    if opts.get("ensure_weight_tying"):
        # peft 0.21 ties the adapters of tied embeddings as two parameters over one memory, which any optimizer
        # over the model's parameters steps twice (measured: up to twice the learning rate's step), and its fp32
        # cast of adapters over a bf16 base unties them again
        raise ValueError("ensure_weight_tying is not supported for training: peft's tied adapters are two "
                         "parameters over one memory (stepped twice by the optimizer) and come apart over a bf16 "
                         "base; leave it out to train separate adapters on the embedding and the output head")
    # "all-linear" = every linear layer but the output head, on any architecture
    opts.setdefault("target_modules", "all-linear")
    return LoraConfig(task_type=ctx.family.peft_task_type, **opts)


def _ia3(ctx: MethodContext, opts: dict) -> IA3Config:
    scheme = naming_scheme(ctx.model)
    opts = dict(opts)
    opts.setdefault("target_modules", scheme["key_value"] + scheme["ff_out"])
    # peft requires feed-forward modules to be a subset of the targets
    opts.setdefault("feedforward_modules", [m for m in scheme["ff_out"] if m in opts["target_modules"]])
    return IA3Config(task_type=ctx.family.peft_task_type, **opts)


def _prefix_tuning(ctx: MethodContext, opts: dict) -> PrefixTuningConfig:
    opts = dict(opts)
    opts.pop("init", None)  # read by _init_prefix_from_text once the model is wrapped
    return PrefixTuningConfig(task_type=ctx.family.peft_task_type, **opts)


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def _init_prefix_from_text(model: torch.nn.Module, ctx: MethodContext, opts: dict) -> None:
    """Start the prefix from the model's own keys and values for the task instruction (Li & Liang, 2021, §7.2).

    peft starts prefixes from N(0, 1) vectors, far from the scale of real keys and values: on SmolLM2-135M
    the first training loss is about 14 instead of about 3, and a short budget never recovers. The
    instruction's tokens are repeated to fill the virtual tokens. Decoder-only models only: for an
    encoder-decoder peft feeds one prefix to both decoder self-attention and cross-attention, whose keys and
    values live in different spaces, so no single text activation fits both.
    """
    if opts.get("init", "text") != "text" or ctx.family.is_encoder_decoder:
        return
    from transformers import AutoTokenizer
    config = model.peft_config[model.active_adapter]
    if config.prefix_projection:
        return  # the MLP's input is not a key/value vector
    ids = AutoTokenizer.from_pretrained(ctx.model_path)(ctx.instruction, add_special_tokens=False)["input_ids"]
    ids = (ids * (config.num_virtual_tokens // max(len(ids), 1) + 1))[: config.num_virtual_tokens]
    base = model.get_base_model()
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight
    cache = base(input_ids=torch.tensor([ids], device=embedding.device), use_cache=True).past_key_values
    target = torch.stack([t[0] for layer in _cache_layers(cache) for t in layer])  # [layers*2, heads, tokens, dim]
    # peft reads the prefix as [tokens, layers*2, heads, dim], flattened per token
    embedding.copy_(target.permute(2, 0, 1, 3).reshape(embedding.shape).to(embedding.dtype))
    produced = _cache_layers(model.get_prompt(batch_size=1))
    expected = [(target[2 * i], target[2 * i + 1]) for i in range(len(target) // 2)]
    for (k, v), (k_ref, v_ref) in zip(produced, expected, strict=True):
        if not (torch.allclose(k[0].float(), k_ref.float(), atol=1e-3) and torch.allclose(
                v[0].float(), v_ref.float(), atol=1e-3)):
            raise RuntimeError("peft's prefix layout changed: the text initialisation would be scrambled")


@dataclass(frozen=True)
class SharedBeginning:
    """The positions every row of a decoder-only model's generation batch starts with, the same in each row and
    attended by all: a prompt-learning method's virtual tokens. ``layers()`` gives each layer's keys and values
    for one row, ``length`` positions, computed from the adapter's current weights; the prompt's own positions
    count on from ``length``, as in training. Generation can then compute them once per batch instead of once
    per row, and prefill the rows in groups (generation.prefill_by_length)."""
    length: int
    layers: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]


_SHARED_BEGINNING = "_peft_nlg_shared_beginning"


def shared_beginning(model: torch.nn.Module) -> SharedBeginning | None:
    """What a method attached to ``model`` (the base model that peft generates with) for its rows to share."""
    return getattr(model, _SHARED_BEGINNING, None)


def _attach_shared_beginning(model: torch.nn.Module, layers: Callable[[torch.nn.Module], list]) -> None:
    base = model.get_base_model()
    if base.config.is_encoder_decoder:  # the prompt goes to the encoder: nothing every decoder row starts with
        return
    length = model.peft_config[model.active_adapter].num_virtual_tokens
    setattr(base, _SHARED_BEGINNING, SharedBeginning(length, lambda: layers(model)))


def _prefix_layers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefix tuning's trained keys and values, as peft injects them into the cache."""
    return _cache_layers(model.get_prompt(batch_size=1))


def _virtual_token_layers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values the base model computes for the virtual tokens that peft puts before every prompt
    (prompt tuning, P-tuning): they attend only to each other, at positions 0 to their count - 1."""
    base = model.get_base_model()
    embeds = model.get_prompt(batch_size=1).to(base.get_input_embeddings().weight.dtype)
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    return _cache_layers(base(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1)["cache"])


def _prefix_generation(model: torch.nn.Module) -> None:
    _route_prompt_through_cache(model)
    _attach_shared_beginning(model, _prefix_layers)


def _route_prompt_through_cache(model: torch.nn.Module) -> None:
    """Make peft's prompt injection see the KV cache during ``generate`` with transformers 5.x.

    transformers 5.x's ``generate`` hands the KV cache over as ``cache``; peft 0.21 looks for
    ``past_key_values``. Left alone, peft never sees a filled cache: prefix tuning's trained prefix is
    silently dropped ("both are set, using cache") and soft prompts are injected again at every decoding
    step. Renaming on the way in and out lets peft see the cache it expects.
    """
    if getattr(model, "_peft_nlg_prefix_route", False):
        return
    base_prepare, peft_prepare = model.base_model_prepare_inputs_for_generation, model.prepare_inputs_for_generation

    def base_with_peft_names(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def peft_with_model_names(*args, **kwargs):
        inputs = peft_prepare(*args, **kwargs)
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.base_model_prepare_inputs_for_generation = base_with_peft_names
    model.prepare_inputs_for_generation = peft_with_model_names
    model._peft_nlg_prefix_route = True


def _soft_prompt_generation(model: torch.nn.Module) -> None:
    """The cache fix above, plus: left-padded rows get the same positions in ``generate`` as in training.

    peft drops position ids for prompt-learning methods, so a decoder-only model numbers the
    ``[virtual tokens][padding][prompt]`` sequence by raw index and a left-padded row's prompt lands on
    other positions than in training (where padding goes right). Positions counted over the attention
    mask, which includes the virtual tokens, restore the training layout.
    """
    _route_prompt_through_cache(model)
    _attach_shared_beginning(model, _virtual_token_layers)
    if model.get_base_model().config.is_encoder_decoder or getattr(model, "_peft_nlg_mask_positions", False):
        return
    peft_prepare = model.prepare_inputs_for_generation

    def with_mask_positions(*args, **kwargs):
        with warnings.catch_warnings():
            # peft warns that it drops the base model's positions; the ones set below replace them
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            inputs = peft_prepare(*args, **kwargs)
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            embeds = inputs.get("inputs_embeds")
            step = embeds if embeds is not None else inputs["input_ids"]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = positions[:, -step.shape[1]:]
        return inputs

    model.prepare_inputs_for_generation = with_mask_positions
    model._peft_nlg_mask_positions = True


def _p_tuning(ctx: MethodContext, opts: dict) -> PromptEncoderConfig:
    return PromptEncoderConfig(task_type=ctx.family.peft_task_type, **opts)


def _prompt_tuning(ctx: MethodContext, opts: dict) -> PromptTuningConfig:
    opts = dict(opts)
    init = opts.pop("init", "text")
    if init == "text":
        # starting from the task instruction's embeddings trains faster and steadier than random vectors
        opts.update(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=ctx.instruction,
                    tokenizer_name_or_path=ctx.model_path)
    return PromptTuningConfig(task_type=ctx.family.peft_task_type, **opts)


@dataclass(frozen=True)
class Method:
    name: str
    title: str                                   # as shown in the results table
    summary: str                                 # one line for --help and the README
    build: Callable[[MethodContext, dict], PeftConfig] | None  # None: train every weight
    # which training features the method allows
    supports_gradient_checkpointing: bool = True
    # whether every transformer block can run one shared compiled graph (models.compile_repeated_layers)
    supports_compiled_blocks: bool = True
    # why a long GPU run of this method trains eagerly unless --compile asks (empty: compiled blocks are the
    # default there, training.use_compiled_blocks)
    eager_by_default: str = ""
    # applied to the peft-wrapped model before it generates (version compatibility fixes)
    prepare_for_generation: Callable[[torch.nn.Module], None] | None = None
    # applied once to a freshly wrapped model before training (initialisation peft does not offer)
    initialize: Callable[[torch.nn.Module, MethodContext, dict], None] | None = None
    # whether a trained adapter can be folded into the base weights for generation (peft's merge_and_unload):
    # the same function, computed by the base model's layers alone
    merges_into_base: bool = False

    @property
    def is_peft(self) -> bool:
        return self.build is not None

    def peft_config(self, ctx: MethodContext, options: dict) -> PeftConfig | None:
        return self.build(ctx, options) if self.build else None

    def ready_for_generation(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.prepare_for_generation is not None:
            self.prepare_for_generation(model)
        return model


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "Full fine-tuning", "train every weight of the model", None,
           # four PEFT methods trained 1.8-1.9x faster compiled on an H200 (2026-11-27); full fine-tuning, the one
           # method whose fp32 weights are cast under autocast in each block, 0.68x on an H100 (2026-12-06)
           eager_by_default="compiled blocks trained full fine-tuning at 0.68x of eager speed on an H100"),
    Method("lora", "LoRA", "low-rank updates added to every linear layer (Hu et al., 2021)", _lora,
           merges_into_base=True),
    Method("prefix_tuning", "Prefix Tuning",
           "trained key/value vectors prepended in every attention layer (Li & Liang, 2021)", _prefix_tuning,
           supports_gradient_checkpointing=False, prepare_for_generation=_prefix_generation,
           initialize=_init_prefix_from_text,
           # each block reads its own layer of the prefix cache by index, so the compiler builds one graph per
           # block; past its limit of 8 it runs the rest eagerly: 0.98x eager on an H200, 38 s lost (2026-11-27)
           supports_compiled_blocks=False),
    Method("p_tuning", "P-Tuning", "virtual prompt tokens produced by a small MLP encoder (Liu et al., 2021)",
           _p_tuning, prepare_for_generation=_soft_prompt_generation),
    Method("prompt_tuning", "Prompt Tuning",
           "trained soft-prompt embeddings prepended to the input (Lester et al., 2021)", _prompt_tuning,
           prepare_for_generation=_soft_prompt_generation),
    Method("ia3", "IA3", "learned rescaling of keys, values and feed-forward activations (Liu et al., 2022)",
           _ia3, merges_into_base=True),
)}

# command-line spellings of the original study
ALIASES = {"vanilla": "none", "full": "none", "ptuning": "p_tuning", "prefix": "prefix_tuning",
           "prompt": "prompt_tuning"}


def get_method(name: str) -> Method:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[key]
