"""The training loop's plumbing for speed: which attention kernels runs may use, batches built one step ahead
still train every planned batch exactly once, and adapters skip input casts that bf16 autocast undoes."""

import json
import math
from collections import Counter

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode

from peft_nlg import runtime, training
from peft_nlg.batching import collate
from peft_nlg.config import build_config
from peft_nlg.data.io import read_pairs
from peft_nlg.evaluation import decoding
from peft_nlg.evaluation import test as run_test
from peft_nlg.generation import generate
from peft_nlg.methods import METHODS
from peft_nlg.runtime import load_for_training


def _data(root, n_train=12):
    """A translation split whose train and valid sources differ, so each use of an example can be counted."""
    (root / "translation").mkdir(parents=True)
    rows = {"train": [(f"Sentence number {i} is here{'.' * (i % 4)}", f"Satz {i}") for i in range(n_train)],
            "valid": [("Where is the station?", "Wo ist der Bahnhof?"), ("Hi", "Hallo")],
            "test": [("Hi", "Hallo")]}
    for split, pairs in rows.items():
        (root / "translation" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"src": s, "trg": t}) + "\n" for s, t in pairs))
    return root


def _config(model, data, out, **extra):
    return build_config({"task": "translation", "method": "lora", "model": str(model), "data_dir": str(data),
                         "output_dir": str(out), "report_to": "none", "learning_rate": 1e-3,
                         "save_checkpoints": False, **extra})


def test_each_planned_batch_trains_once_per_epoch(tiny_models, tmp_path, monkeypatch):
    data = _data(tmp_path / "data")
    built = []
    real_training_batch = training.training_batch

    def counting_training_batch(features, *args):
        built.append([tuple(f["input_ids"]) for f in features])
        return real_training_batch(features, *args)

    monkeypatch.setattr(training, "training_batch", counting_training_batch)
    # about three examples per batch, so an epoch has several steps and the next step's batches are built ahead
    config = _config(tiny_models["llama"], data, tmp_path / "run", epochs=2, batch_tokens=300, patience=9)
    record = training.train(config)

    prompter = load_for_training(config, torch.device("cpu"), torch.float32).prompter
    encoded = {split: [tuple(f["input_ids"]) for f in
                       prompter.encode_many(read_pairs(data / "translation" / f"{split}.jsonl"))]
               for split in ("train", "valid")}
    valid_ids = set(encoded["valid"])
    train_batches = [batch for batch in built if not valid_ids & set(batch)]
    used = Counter(ids for batch in train_batches for ids in batch)
    assert len(train_batches) == record["steps"] > 4 and max(map(len, train_batches)) > 1
    assert used == Counter({ids: 2 for ids in encoded["train"]})  # two epochs: every example twice, none more


def test_attention_kernels_exclude_cudnn_unless_asked(tiny_models, tmp_path, monkeypatch):
    data = _data(tmp_path / "data", n_train=4)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    for allow in (False, True):
        seen.clear()
        config = _config(tiny_models["llama"], data, tmp_path / f"run-{allow}", max_steps=2, cudnn_attention=allow)
        record = training.train(config)
        assert seen and set(seen) == {allow}, seen  # training steps and validation
        assert ("no cuDNN" in record["attention_kernels"]) is not allow

        seen.clear()
        loaded = load_for_training(config, torch.device("cpu"), torch.float32)
        settings = decoding(build_config({**config.to_dict(), "max_new_tokens": 3}), on_gpu=False)
        _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, ["Hi", "Where is it?"], settings,
                            torch.device("cpu"), show_progress=False)
        assert seen and set(seen) == {allow}, seen
        assert ("no cuDNN" in stats["attention_kernels"]) is not allow
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the setting does not leak out of a run


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _lora_step(model, batch) -> tuple[float, list, Counter]:
    """One training forward and backward pass under bf16 autocast: loss, gradients, the ops it dispatched."""
    counter = _CountOps()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad], counter.ops


def test_adapters_skip_the_input_cast_that_bf16_autocast_undoes(tiny_models, tmp_path):
    data = _data(tmp_path / "data", n_train=4)
    config = _config(tiny_models["llama"], data, tmp_path / "run", precision="bf16")
    cpu, batch = torch.device("cpu"), {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])}
    runs = {}
    for peft_default in (True, False):
        torch.manual_seed(0)  # the same adapter initialisation both times
        model = load_for_training(config, cpu, torch.bfloat16).model
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and not any(m.cast_input_dtype_enabled for m in layers)
        if peft_default:
            runtime.set_adapter_input_casts(model, True)
        runs[peft_default] = _lora_step(model, batch)
    (loss, grads, ops), (loss_ours, grads_ours, ops_ours) = runs[True], runs[False]
    assert loss == loss_ours and all(torch.equal(a, b) for a, b in zip(grads, grads_ours, strict=True))
    # peft casts the input up (and its gradient back down), autocast casts it back down (and its gradient up);
    # the first block's query, key and value projections read the frozen embeddings: no gradient casts there
    saved = 4 * len(layers) - 2 * 3
    assert ops["aten._to_copy"] - ops_ours["aten._to_copy"] == saved
    assert sum(ops.values()) - sum(ops_ours.values()) == saved

    fp32_model = load_for_training(build_config({**config.to_dict(), "precision": "fp32"}), cpu, torch.float32).model
    assert all(m.cast_input_dtype_enabled for m in fp32_model.modules() if isinstance(m, BaseTunerLayer))


def test_lora_trains_and_tests_in_bf16_as_on_a_gpu(tiny_models, tmp_path, monkeypatch):
    """The GPU's path on the CPU: a bf16 base under autocast with fp32 adapters, in training, validation and
    test-mode generation (the test loads the base in bf16 as on a GPU)."""
    data = _data(tmp_path / "data", n_train=4)
    # a run in another precision earlier in the same process (accelerate keeps one per process unless reset)
    training.train(_config(tiny_models["llama"], data, tmp_path / "fp32", precision="fp32", max_steps=1))
    config = _config(tiny_models["llama"], data, tmp_path / "run", precision="bf16", max_steps=3, eval_every=1)
    record = training.train(config)
    assert record["compute_dtype"] == "bfloat16" and record["steps"] == 3
    assert all(torch.isfinite(torch.tensor(h["valid_loss"])) for h in record["history"] if "valid_loss" in h)

    monkeypatch.setattr(runtime, "_inference_dtype", lambda dev, dtype: dtype)
    result = run_test(build_config({**config.to_dict(), "search": "greedy", "max_new_tokens": 4}))
    loaded = runtime.load_trained(config.out, config, torch.device("cpu"), torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16  # the base, as on a GPU
    assert result["test_examples"] == 1 and result["generation"]["new_tokens"] > 0


def test_bf16_training_on_the_cpu_computes_attention_in_fp32(tiny_models, tmp_path):
    data = _data(tmp_path / "data")
    cpu = torch.device("cpu")
    config = _config(tiny_models["llama"], data, tmp_path / "run", method="none", precision="bf16", max_steps=1)
    model = load_for_training(config, cpu, torch.bfloat16).model
    assert model.config._attn_implementation == runtime.CPU_BF16_ATTENTION
    # fp32 training is left as it is
    assert load_for_training(config, cpu, torch.float32).model.config._attn_implementation == "sdpa"

    # the attention of bf16 inputs is fp32 attention rounded once to bf16
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    attention = model.model.layers[0].self_attn
    shape = (2, model.config.num_attention_heads, 5, model.config.hidden_size // model.config.num_attention_heads)
    kv_shape = (shape[0], model.config.num_key_value_heads, *shape[2:])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=generator).bfloat16() for s in (shape, kv_shape, kv_shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = runtime._sdpa_in_fp32(attention, q, k, v, None, is_causal=True)
    reference, _ = sdpa_attention_forward(attention, q.float(), k.float(), v.float(), None, is_causal=True)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference.bfloat16())

    # training uses it, and the saved model does not carry it: stock transformers reloads it with SDPA
    record = training.train(config)
    assert record["compute_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config._attn_implementation == "sdpa"
    # T5 passes its position bias to the same attention function: it trains too, with a finite loss
    t5 = _config(tiny_models["t5"], data, tmp_path / "t5", method="lora", precision="bf16", max_steps=1)
    assert load_for_training(t5, cpu, torch.bfloat16).model.config._attn_implementation == runtime.CPU_BF16_ATTENTION
    assert math.isfinite(training.train(t5)["best_valid_loss"])


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fp32_attention_gets_the_masks_sdpa_gets(tiny_models, tmp_path, arch, method):
    """The registered fp32 attention must see the masks transformers builds for SDPA: registered without a mask
    builder it got none, so T5 attended to padding and prefix tuning lost its virtual tokens."""
    data = _data(tmp_path / "data")
    config = _config(tiny_models[arch], data, tmp_path / "run", method=method, precision="fp32")
    loaded = load_for_training(config, torch.device("cpu"), torch.float32)
    model = loaded.model.eval()
    rows = read_pairs(data / "translation" / "train.jsonl")[:4]  # sources of three lengths: padding in the batch
    batch = collate(loaded.prompter.encode_many(rows), loaded.tokenizer.pad_token_id, "right")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    losses = {}
    runtime.register_fp32_attention()
    for implementation in ("sdpa", runtime.CPU_BF16_ATTENTION):
        base.set_attn_implementation(implementation)
        with torch.no_grad():
            losses[implementation] = model(**batch).loss.item()
    assert losses["sdpa"] == pytest.approx(losses[runtime.CPU_BF16_ATTENTION], rel=1e-6, abs=0), losses


def test_auto_precision_on_a_cpu_follows_its_bf16_hardware(monkeypatch):
    config, cpu = build_config({"precision": "auto"}), torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.compute_dtype(config, cpu) == torch.bfloat16
    assert runtime._inference_dtype(cpu, torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.compute_dtype(config, cpu) == torch.float32
    assert runtime._inference_dtype(cpu, torch.bfloat16) == torch.float32  # an explicit bf16 trains, tests in fp32
    assert runtime.compute_dtype(build_config({"precision": "fp32"}), cpu) == torch.float32


@pytest.mark.parametrize(("amx", "avx512_bf16", "fast"), [
    (True, False, True), (False, True, True), (True, True, True), (False, False, False)])
def test_bf16_counts_as_fast_on_cpus_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert runtime.cpu_has_fast_bf16() is fast
    assert runtime.compute_dtype(build_config({"precision": "auto"}), torch.device("cpu")) == (
        torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize(("schedule", "expected"), [
    # warm-up over 2 steps (the first already moves), then down towards 0 at step 6
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_each_step_uses_the_scheduled_learning_rate(tiny_models, tmp_path, monkeypatch, schedule, expected):
    used = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = _config(tiny_models["llama"], _data(tmp_path / "data", n_train=24), tmp_path / "run", max_steps=6,
                     batch_tokens=200, warmup_steps=2, lr_schedule=schedule, patience=99)
    training.train(config)
    assert used == pytest.approx([1e-3 * factor for factor in expected])


def test_linear_decay_and_a_misspelt_schedule_is_one_clear_error():
    assert [training.learning_rate_factor(s, warmup=4, total=8, schedule="linear") for s in range(8)] == \
        pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match=r"lr_schedule must be linear, cosine, constant, not 'cosin'"):
        build_config({"lr_schedule": "cosin"})


@pytest.mark.parametrize(("arch", "method"), [("llama", "none"), ("llama", "prefix_tuning"), ("t5", "lora")])
def test_batches_split_for_memory_train_the_same_weights(tiny_models, tmp_path, monkeypatch, arch, method):
    """``max_forward_tokens`` runs a batch in chunks of rows whose gradients add up to the whole batch's: the
    same steps, tokens and trained weights (fp32, up to rounding), with no pass above the limit."""
    from safetensors.torch import load_file

    from peft_nlg.batching import split_for_memory

    data = _data(tmp_path / "data", n_train=16)
    passes = []
    real_training_batch = training.training_batch

    def recording_training_batch(features, *args):
        batch, n_targets, n_real = real_training_batch(features, *args)
        passes.append((len(features), batch["input_ids"].numel() + (batch["labels"].numel() if arch == "t5" else 0)))
        return batch, n_targets, n_real

    monkeypatch.setattr(training, "training_batch", recording_training_batch)
    runs = {}
    for name, limit in (("whole", 10**9), ("split", 200)):
        passes.clear()
        config = _config(tiny_models[arch], data, tmp_path / name, method=method, epochs=2, batch_tokens=800,
                         max_forward_tokens=limit, precision="fp32", patience=9)
        record = training.train(config)
        weights = {k: v for f in sorted((tmp_path / name / "model").glob("*.safetensors")) for k, v in
                   load_file(f).items()}
        assert passes[0][0] == 2  # the first batch built is validation's (both examples), which is not split
        runs[name] = (record, weights, passes[1:])
    (whole, whole_weights, whole_passes), (split, split_weights, split_passes) = runs["whole"], runs["split"]
    assert (split["steps"], split["train_tokens"]) == (whole["steps"], whole["train_tokens"])
    assert len(split_passes) > len(whole_passes)  # the limit did split batches ...
    # ... above the limit, as no pass of the split run is, and chunks hold several rows where they fit
    assert max(t for _, t in whole_passes) > 200 >= max(t for _, t in split_passes)
    assert max(rows for rows, _ in split_passes) > 1
    assert [round(h["valid_loss"], 3) for h in split["history"]] == [round(h["valid_loss"], 3)
                                                                    for h in whole["history"]]
    assert whole_weights.keys() == split_weights.keys()
    for key, value in whole_weights.items():
        torch.testing.assert_close(split_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert split["config"]["max_forward_tokens"] == 200
    # the chunks cover the batch's rows once each, every chunk within the limit unless one row alone exceeds it
    lengths = [5, 9, 3, 30, 8, 8, 2]
    chunks = split_for_memory(list(range(7)), lengths, 16)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(7))
    assert all(len(c) * max(lengths[i] for i in c) <= 16 or len(c) == 1 for c in chunks) and [3] in chunks
    assert split_for_memory([0, 1, 2], lengths, 27) == [[0, 1, 2]] == split_for_memory([0, 1, 2], lengths, 0)
