"""The training loop's plumbing for speed: which attention kernels runs may use, and batches built one step
ahead still train every planned batch exactly once."""

import json
from collections import Counter

import torch

from peft_nlg import training
from peft_nlg.config import build_config
from peft_nlg.data.io import read_pairs
from peft_nlg.evaluation import decoding
from peft_nlg.generation import generate
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
