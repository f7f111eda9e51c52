"""What each method keeps for the backward pass, and how many ops a training step dispatches: the memory
claim of PEFT, and the host's share of a GPU step, measured without a GPU.

At the study's batch sizes a 135M model's peak training memory is mostly activations, the tensors autograd
saves in the forward pass for the backward pass. This counts them exactly, for every method as the study
configures it (``defaults/methods.yaml``) and for variants given with ``--variant``, on real examples of a
task, on a randomly initialised model of the embedded architecture loaded the way training loads it. Each
saved storage is counted once and split into the model's own parameters (weights the backward pass reads,
which exist anyway) and everything else (activations; in ``--precision bf16`` this includes the bf16 copies
autocast makes of fp32 trained weights, about 0.26 GB for full fine-tuning). The same pass counts the ops it
dispatches, forward and backward, views apart: on a GPU each is a kernel the host launches, and at the study's
sizes a step of a small model waits on those launches (benchmarks/results/profiles/). Prints a table, writes JSON.

  python benchmarks/activation_memory.py --arch-dir ~/.cache/peft-nlg/models/SmolLM2-135M-Instruct \\
      --variant lora:lora_dropout=0.05 --out benchmarks/results/activations/DATE-fp32.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peft_nlg.batching import token_budget_batches, training_batch
from peft_nlg.config import build_config
from peft_nlg.data.io import read_pairs, write_json
from peft_nlg.loss import summed_loss
from peft_nlg.methods import METHODS
from peft_nlg.runtime import hardware, load_for_training, package_versions, set_adapter_input_casts

MIB = 2**20


class CountOps(TorchDispatchMode):
    """Counts the ops that reach the kernels, views (which launch none) apart."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def saved_for_backward(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> dict:
    """Bytes of the storages autograd saves while ``forward()`` runs, the model's parameters apart from the
    rest; each storage counted once, however many views of it are saved; and the ops the forward and backward
    passes dispatch."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    sizes = {"parameters": 0, "activations": 0}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes["parameters" if storage.data_ptr() in parameter_storages else "activations"] += storage.nbytes()
        return tensor

    ops = CountOps()
    with ops:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            output = forward()
        # the backward pass releases what was saved (the loss's checkpointed chunks hold it until then)
        output.sum().backward()
    return {**sizes, "ops": ops.ops}


def training_forward(model: torch.nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """The training loop's forward pass and loss, in its precision."""
    model.train()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return summed_loss(model, batch, is_encoder_decoder=False)[0]


def parse_variant(text: str) -> tuple[str, dict]:
    """'lora:lora_dropout=0.05;r=8' -> ('lora', {'lora_dropout': 0.05, 'r': 8})."""
    method, _, options = text.partition(":")
    pairs = (item.split("=", 1) for item in options.split(";") if item)
    return method, {key: yaml.safe_load(value) for key, value in pairs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch-dir", required=True, help="config.json + tokenizer of the architecture")
    ap.add_argument("--task", default="translation")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--tokens", type=int, default=4096, help="padded tokens in the measured batch")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: as on a GPU (frozen base in bf16, autocast); fp32: as on a CPU")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variant", action="append", default=[], metavar="METHOD:KEY=VALUE;...",
                    help="one more row: a method with other options, e.g. lora:lora_dropout=0.05")
    ap.add_argument("--peft-input-casts", action="store_true",
                    help="keep peft's cast of each adapter's input to its weights' dtype (which training skips "
                         "under bf16 autocast, runtime.skip_adapter_input_casts), to compare")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    work = Path(tempfile.mkdtemp(prefix="peft-nlg-activations-"))
    torch.manual_seed(0)  # one random initialisation, saved, shared by every row
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.arch_dir)).save_pretrained(work)
    AutoTokenizer.from_pretrained(args.arch_dir).save_pretrained(work)
    examples = read_pairs(Path(args.data_dir) / args.task / "train.jsonl")[:2000]

    rows = [(name, {}) for name in args.methods.split(",")] + [parse_variant(v) for v in args.variant]
    results = {"date": time.strftime("%Y-%m-%d"), "device": hardware(torch.device("cpu")),
               "versions": package_versions(), "task": args.task, "precision": args.precision,
               "arch": str(args.arch_dir), "peft_input_casts": args.peft_input_casts, "rows": []}
    for method, options in rows:
        overrides = {"task": args.task, "method": method, "model": str(work), "data_dir": args.data_dir}
        if options:
            overrides["method_options"] = options
        config = build_config(overrides)
        loaded = load_for_training(config, torch.device("cpu"), dtype)
        if args.peft_input_casts:
            set_adapter_input_casts(loaded.model, True)
        features = loaded.prompter.encode_many(examples)
        # the study's kind of batch (similar lengths, as many examples as fit the padded-token budget): the one
        # in the middle of the length order
        batches = token_budget_batches([len(f["input_ids"]) for f in features], args.tokens, 10**6)
        chosen = batches[len(batches) // 2]
        batch, n_targets, n_real = training_batch([features[i] for i in chosen], loaded.tokenizer.pad_token_id,
                                                  False)
        sizes = saved_for_backward(loaded.model, partial(training_forward, loaded.model, batch, dtype))
        row = {"method": method, "options": config.method_options, "examples": len(chosen), "real_tokens": n_real,
               "target_tokens": n_targets, "activations_mib": round(sizes["activations"] / MIB, 1),
               "activations_mib_per_1k_tokens": round(sizes["activations"] / MIB * 1000 / n_real, 1),
               "parameters_read_mib": round(sizes["parameters"] / MIB, 1), "ops_per_step": sizes["ops"]}
        del loaded, batch  # one model in memory at a time
        gc.collect()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(Path(args.out), results)
    print(markdown_table(results))
    return 0


def markdown_table(results: dict) -> str:
    lines = ["| method | options | real tokens | saved activations MiB | per 1k real tokens | parameters read MiB "
             "| ops per step |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        options = ", ".join(f"{k} {v}" for k, v in r["options"].items() if k != "target_modules") or "–"
        lines.append(f"| {r['method']} | {options} | {r['real_tokens']:,} | {r['activations_mib']:,.0f} | "
                     f"{r['activations_mib_per_1k_tokens']:,.0f} | {r['parameters_read_mib']:,.0f} | "
                     f"{format(r['ops_per_step'], ',') if 'ops_per_step' in r else '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
