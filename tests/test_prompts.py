"""Where a decoder-only model's instruction goes: its own system turn, or the line before the source in the
user turn when the chat template cannot hold a system turn or a run asks for it; a run's own instruction."""

import json
import shutil

import pytest
import torch
from tiny_models import CHAT_TEMPLATE
from transformers import AutoTokenizer

from peft_nlg import cli
from peft_nlg.config import build_config
from peft_nlg.runtime import load_for_training

CPU = torch.device("cpu")
# templates as some model families ship them: one refuses the system role, one drops it without a word
REFUSES_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DROPS_SYSTEM = ("{% for message in messages %}{% if message['role'] != 'system' %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SOURCE = "Where is the station?"


def _model_with_template(tiny_models, tmp_path, template):
    directory = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return directory


def _prompt_text(model_dir, **settings):
    config = build_config({"task": "dialogue", "method": "lora", "model": str(model_dir), **settings})
    loaded = load_for_training(config, CPU, torch.float32)
    return loaded.prompter, loaded.tokenizer.decode(loaded.prompter.prompt_ids(SOURCE))


@pytest.mark.parametrize(("template", "turn"), [(CHAT_TEMPLATE, "system"), (REFUSES_SYSTEM, "user"),
                                                (DROPS_SYSTEM, "user")],
                         ids=["keeps-system", "refuses-system", "drops-system"])
def test_auto_puts_the_instruction_where_the_template_keeps_it(tiny_models, tmp_path, template, turn):
    prompter, text = _prompt_text(_model_with_template(tiny_models, tmp_path, template))
    assert prompter.instruction_turn == turn
    instruction = prompter.task.instruction
    assert text.count(instruction) == 1 and text.index(instruction) < text.index(SOURCE)
    if turn == "user":
        assert f"<|im_start|>user\n{instruction}\n{SOURCE}<|im_end|>" in text
    else:
        assert f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{SOURCE}<|im_end|>" in text


def test_a_runs_own_instruction_in_the_user_turn_is_the_stock_recipes_prompt(tiny_models):
    """The speed benchmark's same-quality check trains ours on the recipe's prompt: the same token ids."""
    recipe_instruction = "Reply to the message:\n"  # the stock recipe's, ending in its line break
    prompter, _ = _prompt_text(tiny_models["llama"], instruction=recipe_instruction, instruction_turn="user")
    tokenizer = prompter.tokenizer
    recipe = tokenizer.apply_chat_template([{"role": "user", "content": recipe_instruction + SOURCE}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompter.prompt_ids(SOURCE) == tokenizer(recipe, add_special_tokens=False)["input_ids"]
    # and the default differs from it, so the equality above is not the default's
    default, _ = _prompt_text(tiny_models["llama"])
    assert default.prompt_ids(SOURCE) != prompter.prompt_ids(SOURCE)


def test_a_runs_own_instruction_starts_the_soft_prompt(tiny_models):
    """Prompt tuning starts from the instruction's embeddings: the run's own, when it sets one."""
    instruction = "Answer kindly."
    config = build_config({"task": "dialogue", "method": "prompt_tuning", "model": str(tiny_models["llama"]),
                           "instruction": instruction})
    loaded = load_for_training(config, CPU, torch.float32)
    assert loaded.model.peft_config["default"].prompt_tuning_init_text == instruction


def test_unknown_instruction_turn_is_refused_by_name(tiny_models):
    with pytest.raises(ValueError, match="instruction_turn must be auto, system, user, not 'assistant'"):
        _prompt_text(tiny_models["llama"], instruction_turn="assistant")


def test_a_template_without_a_system_role_trains_and_tests_from_the_command_line(tiny_models, tiny_data, tmp_path):
    model, out = _model_with_template(tiny_models, tmp_path, REFUSES_SYSTEM), tmp_path / "run"
    assert cli.main(["train", "--task", "dialogue", "--method", "lora", "--model", str(model), "--data-dir",
                     str(tiny_data), "--output-dir", str(out), "--max-steps", "2", "--report-to", "none"]) == 0
    assert cli.main(["test", "--task", "dialogue", "--method", "lora", "--data-dir", str(tiny_data),
                     "--output-dir", str(out), "--search", "greedy", "--max-new-tokens", "4"]) == 0
    assert json.loads((out / "record-test-greedy.json").read_text())["test_examples"] == 3
