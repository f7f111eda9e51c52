"""Turning (source, target) text pairs into token ids for each model family.

Decoder-only models see the task instruction as the system turn of their chat template (or, where the
template has no system role or the run asks for it, on the line before the source in the user turn), and
learn only the assistant turn (loss on answer tokens), which ends in EOS so generation knows where to stop.
Encoder-decoder models see ``prefix + source`` and learn the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_nlg.models import ModelFamily
from peft_nlg.tasks.base import Task

IGNORE_INDEX = -100

INSTRUCTION_TURNS = ("auto", "system", "user")


def template_keeps_system_turn(tokenizer, instruction: str) -> bool:
    """Whether the tokenizer's chat template renders a system turn: some templates refuse the role (an
    exception) and some drop it without a word, which would train and test without the instruction."""
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": "-"}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # jinja's TemplateError, or whatever the template raises for the role
        return False
    return instruction in text


@dataclass
class Prompter:
    task: Task
    family: ModelFamily
    tokenizer: object
    max_source_tokens: int
    max_target_tokens: int
    prefix: str = ""
    instruction: str = ""          # what decoder-only models are told (the task's own unless a run sets one)
    instruction_turn: str = "system"  # where it goes in a chat template: "system" or "user" (before the source)

    @classmethod
    def create(cls, task: Task, family: ModelFamily, tokenizer, model_config, max_source_tokens: int,
               max_target_tokens: int, instruction: str = "", instruction_turn: str = "auto") -> Prompter:
        if instruction_turn not in INSTRUCTION_TURNS:
            raise ValueError(f"instruction_turn must be {', '.join(INSTRUCTION_TURNS)}, not '{instruction_turn}'")
        prefix = ""
        if family.is_encoder_decoder and task.config_task_key:
            params = getattr(model_config, "task_specific_params", None) or {}
            prefix = params.get(task.config_task_key, {}).get("prefix", "")
        instruction = instruction or task.instruction
        if instruction_turn == "auto":
            chat = not family.is_encoder_decoder and tokenizer.chat_template
            instruction_turn = "user" if chat and not template_keeps_system_turn(tokenizer, instruction) else "system"
        return cls(task, family, tokenizer, max_source_tokens, max_target_tokens, prefix, instruction,
                   instruction_turn)

    def _source_texts(self, sources: list[str]) -> list[str]:
        # truncate in tokens, then go back to text so the template (or prefix) wraps whole tokens
        ids = self.tokenizer(list(sources), add_special_tokens=False)["input_ids"]
        return self.tokenizer.batch_decode([i[: self.max_source_tokens] for i in ids])

    def _wrap(self, source: str) -> str:
        tok = self.tokenizer
        if self.family.is_encoder_decoder:
            return self.prefix + source
        if tok.chat_template:
            if self.instruction_turn == "user":  # under the template's own system turn, if it writes one
                messages = [{"role": "user", "content": f"{self.instruction.rstrip()}\n{source}"}]
            else:
                messages = [{"role": "system", "content": self.instruction}, {"role": "user", "content": source}]
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.instruction}\n\n{source}\n\n"

    def prompts(self, sources: list[str]) -> list[list[int]]:
        """Token ids the model is given at generation time, one list per source (tokenised in one batch)."""
        texts = [self._wrap(s) for s in self._source_texts(sources)]
        # encoder-decoder: special tokens (e.g. the closing </s>) come from the tokenizer's post-processing
        return self.tokenizer(texts, add_special_tokens=self.family.is_encoder_decoder)["input_ids"]

    def prompt_ids(self, src: str) -> list[int]:
        return self.prompts([src])[0]

    def targets(self, targets: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        ids = tok(list(targets), add_special_tokens=False)["input_ids"]
        # every target ends in EOS, so the model learns where to stop
        return [i[: self.max_target_tokens - 1] + [tok.eos_token_id] for i in ids]

    def encode_many(self, examples: list[dict]) -> list[dict]:
        """Training features: encoder-decoder keeps source and target apart; decoder-only concatenates."""
        if not examples:
            return []
        prompts = self.prompts([e["src"] for e in examples])
        targets = self.targets([e["trg"] for e in examples])
        pairs = zip(prompts, targets, strict=True)
        if self.family.is_encoder_decoder:
            return [{"input_ids": p, "labels": t} for p, t in pairs]
        return [{"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t} for p, t in pairs]

    def encode(self, example: dict) -> dict:
        return self.encode_many([example])[0]
