"""Turning (source, target) text pairs into token ids for each model family.

Decoder-only models see the task instruction as the system turn of their chat template, the source as
the user turn, and learn only the assistant turn (loss on answer tokens), which ends in EOS so
generation knows where to stop. Encoder-decoder models see ``prefix + source`` and learn the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_nlg.models import ModelFamily
from peft_nlg.tasks.base import Task

IGNORE_INDEX = -100


@dataclass
class Prompter:
    task: Task
    family: ModelFamily
    tokenizer: object
    max_source_tokens: int
    max_target_tokens: int
    prefix: str = ""

    @classmethod
    def create(cls, task: Task, family: ModelFamily, tokenizer, model_config, max_source_tokens: int,
               max_target_tokens: int) -> Prompter:
        prefix = ""
        if family.is_encoder_decoder and task.config_task_key:
            params = getattr(model_config, "task_specific_params", None) or {}
            prefix = params.get(task.config_task_key, {}).get("prefix", "")
        return cls(task, family, tokenizer, max_source_tokens, max_target_tokens, prefix)

    def _source_ids(self, src: str) -> list[int]:
        ids = self.tokenizer(src, add_special_tokens=False)["input_ids"]
        return ids[: self.max_source_tokens]

    def prompt_ids(self, src: str) -> list[int]:
        """Token ids the model is given at generation time."""
        tok = self.tokenizer
        if self.family.is_encoder_decoder:
            # special tokens (e.g. the closing </s>) come from the tokenizer's own post-processing
            text = self.prefix + tok.decode(self._source_ids(src))
            return tok(text, add_special_tokens=True)["input_ids"]
        source = tok.decode(self._source_ids(src))
        if tok.chat_template:
            messages = [{"role": "system", "content": self.task.instruction},
                        {"role": "user", "content": source}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = f"{self.task.instruction}\n\n{source}\n\n"
        return tok(text, add_special_tokens=False)["input_ids"]

    def target_ids(self, trg: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(trg, add_special_tokens=False)["input_ids"][: self.max_target_tokens - 1]
        return ids + [tok.eos_token_id]  # every target ends in EOS, so the model learns where to stop

    def encode(self, example: dict) -> dict:
        """Training features: encoder-decoder keeps source and target apart; decoder-only concatenates."""
        prompt, target = self.prompt_ids(example["src"]), self.target_ids(example["trg"])
        if self.family.is_encoder_decoder:
            return {"input_ids": prompt, "labels": target}
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}

