"""Tiny randomly initialised models of each architecture the tool supports, built from configs.

Each is saved to a directory with a tokenizer, so tests load it through the same code path as a real
model. The tokenizer is a small byte-level BPE trained on a few sentences: any text encodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BlenderbotSmallConfig,
    BlenderbotSmallForConditionalGeneration,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIALS = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
PAD, EOS_S2S, UNK, IM_START, IM_END, ENDOFTEXT = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The cat sits on the mat.", "Die Katze sitzt auf der Matte.", "How are you today?",
    "I am fine, thank you.", "A tool to compress files quickly.", "Der Hund spielt im Garten.",
    "This package provides a library for parsing text.", "Where is the station?", "Wo ist der Bahnhof?",
] * 4
ARCHITECTURES = ("llama", "t5", "marian", "blenderbot_small")


def _bpe(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_tokenizer(decoder_only: bool) -> PreTrainedTokenizerFast:
    tok = _bpe()
    if decoder_only:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       bos_token="<|im_start|>", unk_token="<unk>")
        fast.chat_template = CHAT_TEMPLATE
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_S2S)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    return fast


def make_model(arch: str, vocab_size: int, layers: int = 2, head_dim: int | None = None) -> torch.nn.Module:
    """``head_dim`` (llama only): heads this wide instead of hidden_size / heads (8), as kernels that take only
    some widths need."""
    common_s2s = dict(vocab_size=vocab_size, pad_token_id=PAD, eos_token_id=EOS_S2S, decoder_start_token_id=PAD)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=ENDOFTEXT,
                             tie_word_embeddings=True, initializer_range=0.2, head_dim=head_dim)
        return LlamaForCausalLM(config)
    if arch == "t5":
        config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=layers, num_heads=4, dropout_rate=0.0, **common_s2s,
                          task_specific_params={"translation_en_to_de": {"prefix": "translate English to German: "},
                                                "summarization": {"prefix": "summarize: "}})
        return T5ForConditionalGeneration(config)
    bart_like = dict(d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, init_std=0.2, **common_s2s)
    if arch == "marian":
        return MarianMTModel(MarianConfig(**bart_like))
    if arch == "blenderbot_small":
        return BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(bos_token_id=IM_START, **bart_like))
    raise ValueError(arch)


def save_tiny_model(arch: str, directory: Path, seed: int = 0, layers: int = 2, head_dim: int | None = None) -> Path:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(decoder_only=arch == "llama")
    model = make_model(arch, len(tokenizer), layers, head_dim)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=None if arch == "llama" else PAD)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
