"""Training and generation speed of peft-nlg against the stock HF Trainer + peft recipe, in one process.

Both recipes start from the same randomly initialised model of the embedded model's architecture
(SmolLM2-135M: config and tokenizer from --arch-dir) and train on the same dialogue examples. The
reference recipe is ``hf_trainer_baseline.py`` (shared/bench), imported and called as is; ours gets the
recipe's prompt (its instruction in the user turn), so the two differ only in how they train and generate.
Per method, generation first (timed before any training in the process, see bench_method):

  generation  our test-mode generation, greedy and beam, and the recipe's greedy generate, on the same prompts;
              ours' greedy and the recipe's timed in alternating rounds
  baseline    its Trainer, batch 32 (4 on CPU), pad to longest; real tokens/s after warm-up; peak memory;
              greedy generate in batches of 32
  ours-equal  our training loop at the baseline's real tokens per step and learning rate, on the same
              examples: speed, peak memory at equal tokens per step, and validation loss after the same
              budget (the quality check)
  ours        our loop at its default batch for the device: the speed a user gets
  quality     after the equal-budget training, both recipes' greedy replies to the same test prompts, scored
              with the dialogue metrics (with --init-dir holding real weights, e.g. the embedded model,
              this is the "same quality" check on text; from a random initialisation both score near zero);
              with real weights both recipes also train with other seeds (--quality-seeds), so the table shows
              how far one run's validation loss and scores move by chance, the recipe's and ours side by side;
              for P-tuning, prompt and prefix tuning the recipe's weights are decoded twice: by its generate as
              written (peft's own prompt injection) and with our generation mends, which our weights get too
              (``MENDED_SCORES``); --quality-only runs this part alone (the recipe's side, ours or both, any
              range of seeds), and --pool joins the seeds of several runs into one table

Prints a table and writes JSON. Ratios are ours / baseline from this one run; absolute numbers only mean
something with the device named in the JSON. For generation timed in a fresh process, measure one method per
call and join the files with --merge.

  python benchmarks/speed.py --arch-dir ~/.cache/peft-nlg/models/SmolLM2-135M-Instruct \\
      --baseline ../shared/bench/hf_trainer_baseline.py --out benchmarks/results/DATE-CARD.json
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peft_nlg.config import RunConfig, build_config
from peft_nlg.data.io import read_pairs, write_json
from peft_nlg.evaluation import decoding
from peft_nlg.formatting import IGNORE_INDEX
from peft_nlg.generation import generate
from peft_nlg.methods import Method, get_method
from peft_nlg.runtime import (
    compute_dtype,
    device,
    fold_adapter_for_generation,
    hardware,
    load_for_training,
    load_trained,
    package_versions,
    reset_peak_memory,
)
from peft_nlg.tasks import TASKS
from peft_nlg.training import train, use_compiled_blocks

METHODS = ["none", "lora", "prefix_tuning", "p_tuning", "prompt_tuning", "ia3"]
# the methods whose generation the recipe times (its part "arch"); the others it trains only
RECIPE_TIMES_GENERATION = ("none", "lora")
# what a --generation-only results file measured (its "only")
GENERATION_ONLY = "generation speed (--generation-only)"
# --quality-only's choices: whose training it repeats
QUALITY_SIDES = {"recipe": "the recipe's side", "ours": "our side", "both": "both sides"}


def load_baseline(path: Path, out_dir: Path):
    os.environ["OUT"] = str(out_dir)
    spec = importlib.util.spec_from_file_location("hf_trainer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flops_per_token(config, trainable_all: bool) -> float:
    """Matmul FLOPs per token: forward 2N; backward 2N for activations plus 2N for weight gradients when
    every weight trains (PEFT methods skip most weight gradients). N excludes the embedding lookup."""
    n = sum(p.numel() for name, p in AutoModelForCausalLM.from_config(config).named_parameters()
            if "embed_tokens" not in name)
    n += config.hidden_size * config.vocab_size  # the output head (tied to the embedding)
    return (6 if trainable_all else 4) * n


@torch.no_grad()
def answer_loss(model, tokenizer, features, dev) -> float:
    """Mean answer-token loss over pre-encoded examples, one at a time (no padding effects)."""
    model.eval()
    total, count = 0.0, 0
    # bf16 weights (ours on a GPU or a CPU with bf16 hardware) mix with fp32 adapters, which autocast reconciles
    mixed = dev.type == "cuda" or any(p.dtype == torch.bfloat16 for p in model.parameters())
    for f in features:
        ids = torch.tensor([f["input_ids"]], device=dev)
        labels = torch.tensor([f["labels"]], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed):
            logits = model(input_ids=ids).logits.float()[:, -ids.shape[1]:]  # drop soft-prompt positions
        shift = labels[:, 1:]
        mask = shift != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][mask], shift[mask], reduction="sum"))
        count += int(mask.sum())
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", help="print the markdown table of an existing results JSON and exit")
    ap.add_argument("--by-seed", action="store_true",
                    help="with --render of a quality-only file: also each seed's validation loss and ROUGE-L")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="join results of the same setup measured in several calls (other methods each) into "
                         "--out, and exit")
    ap.add_argument("--arch-dir", help="config.json + tokenizer of the architecture (random initialisation)")
    ap.add_argument("--init-dir", help="start both recipes from these weights instead (a model dir)")
    ap.add_argument("--baseline", default="../shared/bench/hf_trainer_baseline.py")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--layers", type=int, default=0, help="use fewer layers (CPU runs: 2, as the baseline's smoke)")
    ap.add_argument("--baseline-batch", type=int, default=0, help="0: 32 on GPU, 4 on CPU (the recipe's own)")
    ap.add_argument("--baseline-steps", type=int, default=0, help="0: 70 on GPU, 14 on CPU (10 are warm-up)")
    ap.add_argument("--our-steps", type=int, default=0, help="steps of our default-batch run (0: 40 GPU, 8 CPU)")
    ap.add_argument("--gen-prompts", type=int, default=0,
                    help="prompts to generate for greedily (0: 1000 GPU, 512 CPU; test mode sorts the whole test "
                         "split by length into batches of up to 1,024 and 128 prompts, so a few batches' worth "
                         "measures it, and one batch of every length does not)")
    ap.add_argument("--baseline-gen-prompts", type=int, default=0,
                    help="the recipe's greedy prompts, the first of ours (0: 96 on GPU, as many as ours on CPU)")
    ap.add_argument("--beam-prompts", type=int, default=0,
                    help="prompts for our beam search, the first of ours (0: all on GPU, 128 on CPU)")
    ap.add_argument("--valid-examples", type=int, default=64)
    ap.add_argument("--gen-repeats", type=int, default=0,
                    help="time each generation this many times, report the median (0: 3 on CPU, 1 on GPU)")
    ap.add_argument("--greedy-loop", default="auto", choices=["auto", "ours", "transformers"],
                    help="our greedy decoding loop or transformers' (auto: ours on a CPU, as test mode)")
    ap.add_argument("--merge-adapter", default="auto", choices=["auto", "yes", "no"],
                    help="fold LoRA / IA3 into the base weights for our generation, as test mode does (auto: "
                         "when folding keeps the adapter's update)")
    ap.add_argument("--also-greedy-loop", choices=["ours", "transformers"],
                    help="also time greedy generation with this loop (JSON: ours_gen_greedy_<loop>_loop)")
    ap.add_argument("--also-decode-attention", choices=["kernel", "products", "sdpa"],
                    help="also time greedy generation with this decoding-step attention "
                         "(JSON: ours_gen_greedy_<attention>_attention)")
    ap.add_argument("--quality-prompts", type=int, default=0,
                    help="test prompts both trained recipes answer for the quality check (0: 200 GPU, 32 CPU)")
    ap.add_argument("--quality-seeds", type=int, default=-1,
                    help="train both recipes (ours at equal tokens per step) this many more times with other seeds "
                         "(1, 2, ...) for the quality check's run-to-run spread (-1: 2 with --init-dir, 0 otherwise)")
    ap.add_argument("--quality-only", choices=["recipe", "ours", "both"],
                    help="no timings: train only this side (the recipe, ours at its tokens per step, or both) with "
                         "--first-seed and --quality-seeds more seeds, and write the quality check: validation "
                         "loss, test scores by each side's own decoding and by the recipe's generate with our "
                         "generation mends where the method has any")
    ap.add_argument("--generation-only", action="store_true",
                    help="no training: time only the generation (ours' greedy and beam with the method's untrained "
                         "adapter, and the recipe's greedy generate where it times one), e.g. after a change to "
                         "generation alone")
    ap.add_argument("--recipe-quality-only", dest="quality_only", action="store_const", const="recipe",
                    help="the same as --quality-only recipe")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="with --quality-only: the first seed (default 0), so that a later run adds seeds to an "
                         "earlier one's (join them with --pool)")
    ap.add_argument("--our-batches", default="equal-tokens", choices=list(OUR_BATCHES),
                    help="with --quality-only: how ours groups the recipe's examples into steps (equal-tokens: the "
                         "benchmark's own, length-grouped batches of the recipe's real tokens per step, which make "
                         "more and smaller steps; recipe-steps: the recipe's examples per step, length-grouped, so "
                         "as many optimizer steps as the recipe)")
    ap.add_argument("--pool", nargs="+", metavar="JSON",
                    help="join the quality checks of several runs of the same setup (timed or --quality-only, any "
                         "seeds) into one quality-only results file at --out, seed by seed, and exit")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the temporary work directory (trained models, data) instead of removing it at exit")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="our runs' precision (training and generation), as run.py's -precision; auto: the "
                         "tool's default for the device")
    ap.add_argument("--compile", action="store_true", help="also time our default-batch run with --compile")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the timings, profile this many steps of our default-batch run, eager and (with "
                         "--compile) compiled, in short runs of their own; writes <out>-<method>-<variant>-"
                         "profile.txt (where a step's time goes, e.g. why compiling did not pay)")
    ap.add_argument("--cudnn-attention-too", action="store_true",
                    help="also time our default-batch run and greedy generation with cuDNN attention allowed "
                         "(the setting before 2026-11-27), to measure what excluding it buys")
    args = ap.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        print(markdown_table(results))
        if args.by_seed:
            if "only" not in results:
                ap.error("--by-seed needs a quality-only file (--quality-only, --pool)")
            print("\n" + seed_table(results))
        return 0
    for option, join in (("pool", pool_seeds), ("merge", merge_results)):  # one file from several, and exit
        paths = getattr(args, option)
        if paths:
            if not args.out:
                ap.error(f"--{option} needs --out")
            joined = join([json.loads(Path(path).read_text()) for path in paths], paths)
            write_json(Path(args.out), joined)
            print(markdown_table(joined))
            return 0
    if not (args.arch_dir or args.init_dir) or not args.out:
        ap.error("--arch-dir (or --init-dir) and --out are required")
    if args.init_dir and args.layers:
        ap.error("--layers changes the architecture: it needs a random initialisation (--arch-dir)")
    if args.generation_only and args.quality_only:
        ap.error("--generation-only and --quality-only exclude each other: one times generation, one trains")
    if args.first_seed and not args.quality_only:
        ap.error("--first-seed needs --quality-only: the timed run is seed 0's")
    if args.our_batches != "equal-tokens" and not args.quality_only:
        ap.error("--our-batches needs --quality-only: ours@equal's speed is defined at equal tokens per step")

    dev = device()
    on_gpu = dev.type == "cuda"
    bs = args.baseline_batch or (32 if on_gpu else 4)
    base_steps = args.baseline_steps or (70 if on_gpu else 14)
    our_steps = args.our_steps or (40 if on_gpu else 8)
    n_gen = args.gen_prompts or (1000 if on_gpu else 512)
    n_base_gen = args.baseline_gen_prompts or (96 if on_gpu else n_gen)
    args.beam_prompts = min(args.beam_prompts or (n_gen if on_gpu else 128), n_gen)
    args.quality_prompts = args.quality_prompts or (200 if on_gpu else 32)
    if args.quality_seeds < 0:  # from a random initialisation the check only guards against breakage
        args.quality_seeds = 2 if args.init_dir else 0
    work = Path(tempfile.mkdtemp(prefix="peft-nlg-bench-"))
    if not args.keep_work:  # its trained models (GBs for full fine-tuning, each seed) are not results: the JSON is
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    B = load_baseline(Path(args.baseline), work / "baseline")

    if args.init_dir:  # given weights (e.g. the embedded model): the quality check then means something
        init_dir = Path(args.init_dir)
        config = AutoConfig.from_pretrained(init_dir)
    else:  # one random initialisation of the architecture, saved, so both recipes start from the same weights
        config = AutoConfig.from_pretrained(args.arch_dir)
        if args.layers:
            config.num_hidden_layers = args.layers
        tokenizer = AutoTokenizer.from_pretrained(args.arch_dir)
        torch.manual_seed(0)
        init_dir = work / "init"
        AutoModelForCausalLM.from_config(config).save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)

    data_dir = Path(args.data_dir)
    train_rows = read_pairs(data_dir / "dialogue" / "train.jsonl")[: bs * base_steps]
    valid_rows = read_pairs(data_dir / "dialogue" / "valid.jsonl")[: args.valid_examples]
    test_rows = read_pairs(data_dir / "dialogue" / "test.jsonl")[: max(n_gen, n_base_gen, args.quality_prompts)]
    bench_data, recipe_data = write_bench_data(work, read_pairs(data_dir / "dialogue" / "train.jsonl"), train_rows,
                                               valid_rows, test_rows)

    # the baseline's own tokenizer handling (pad = EOS when missing) and encoding
    base_tok = AutoTokenizer.from_pretrained(init_dir)
    if base_tok.pad_token is None:
        base_tok.pad_token = base_tok.eos_token
    base_train = B.encode(base_tok, "dialogue", train_rows)
    base_valid = B.encode(base_tok, "dialogue", valid_rows)
    real_per_example = sum(len(e["input_ids"]) for e in base_train) / len(base_train)
    equal_tokens_per_step = int(bs * real_per_example)

    results = {"device": hardware(dev), "versions": package_versions(), "date": time.strftime("%Y-%m-%d"),
               "weights": str(init_dir) if args.init_dir else "random initialisation (seed 0)",
               "arch": {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size},
               "our_precision": args.precision, "baseline_batch": bs, "baseline_steps": base_steps,
               "real_tokens_per_example": round(real_per_example, 1),
               "equal_tokens_per_step": equal_tokens_per_step,
               "gen_prompts": {"ours": n_gen, "baseline": n_base_gen, "ours_beam": args.beam_prompts},
               "gen_timing": "ours' greedy and the recipe's in alternating rounds",
               "prompt": {"both": "the recipe's", **_recipe_prompt(B)},
               "equal_budget_examples": "the recipe's", "equal_budget_schedule": _recipe_schedule(B),
               "quality_prompts": args.quality_prompts, "valid_examples": args.valid_examples,
               "our_batches": args.our_batches, "methods": {}}
    seeds = list(range(args.first_seed, args.first_seed + args.quality_seeds + 1))
    if args.quality_only:
        quality_rows = test_rows[: args.quality_prompts]
        results["only"] = f"the quality check, {QUALITY_SIDES[args.quality_only]} (--quality-only)"
        for name in args.methods.split(","):
            row = results["methods"][name] = {}
            if args.quality_only in ("recipe", "both"):
                row["baseline"] = recipe_quality_seeds(B, name, seeds, init_dir, base_tok, base_train, base_valid,
                                                       quality_rows, dev, bs, base_steps)
            if args.quality_only in ("ours", "both"):
                row["ours_equal"] = ours_equal_budget_seeds(
                    B, name, seeds, _our_settings(B, name, init_dir, bench_data, args), recipe_data, work,
                    equal_tokens_per_step, bs, valid_rows, quality_rows, dev, base_tok, args.our_batches)
            print(json.dumps({name: row}), flush=True)
            write_json(Path(args.out), results)
        print(markdown_table(results))
        return 0
    if args.generation_only:
        results["only"] = GENERATION_ONLY
        for name in args.methods.split(","):
            common = _our_settings(B, name, init_dir, bench_data, args)
            row, recipe_generation = bench_generation(name, B, args, common, init_dir, base_tok, test_rows, work, dev,
                                                      n_gen, n_base_gen)
            results["methods"][name] = generation_only_row(row, recipe_generation)
            print(json.dumps({name: results["methods"][name]}), flush=True)
            write_json(Path(args.out), results)
        print(markdown_table(results))
        return 0
    for name in args.methods.split(","):
        try:
            row = bench_method(name, B, args, seeds, init_dir, config, base_tok, base_train, base_valid,
                               valid_rows, test_rows, bench_data, recipe_data, work, dev, bs, base_steps, our_steps,
                               n_gen, n_base_gen, real_per_example, equal_tokens_per_step)
        except Exception as err:  # keep measuring the other methods; the JSON says what failed
            row = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            torch.cuda.empty_cache() if on_gpu else None
        results["methods"][name] = row
        print(json.dumps({name: row}), flush=True)
        write_json(Path(args.out), results)  # after every method, so a cut-off run keeps what it measured

    print_table(results)
    return 0


def write_bench_data(work: Path, train_split: list[dict], recipe_rows: list[dict], valid_rows: list[dict],
                     test_rows: list[dict]) -> tuple[Path, Path]:
    """Two copies of the dialogue data: the whole train split (for the speed runs) and the recipe's own training
    examples, nothing else (for the runs whose quality is set beside the recipe's). Returns their data dirs."""
    dirs = work / "data", work / "data-recipe-examples"
    for root, train_rows in zip(dirs, (train_split, recipe_rows), strict=True):
        (root / "dialogue").mkdir(parents=True)
        for split, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows)):
            (root / "dialogue" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dirs


def _our_settings(B, name: str, init_dir: Path, bench_data: Path, args) -> dict:
    """The settings every run of ours shares: the recipe's adapter and prompt, eager, seed 0."""
    return {"task": "dialogue", "method": name, "model": str(init_dir), "data_dir": str(bench_data),
            "report_to": "none", "overwrite": True, "max_valid_examples": args.valid_examples,
            "seed": 0, "method_options": _baseline_like_options(name), "precision": args.precision,
            **_recipe_prompt(B),  # the same prompts as the recipe: the prompt is not a speed lever
            "compile": False}  # eager unless measured with compiled blocks on purpose (bench_method)


# the recipe trains every method at 2e-4 (its part "arch")
RECIPE_LEARNING_RATE = 2e-4
# how ours groups the recipe's examples into steps, from (the recipe's real tokens per step, its batch size):
# the benchmark's definition, length-grouped batches of the recipe's tokens per step (18 steps to the recipe's
# 14 on its CPU budget: padding in a batch counts against the budget), or the recipe's batch size, length-grouped,
# so that both take as many optimizer steps (a quality probe: Adam moves each weight about the same distance per
# step whatever the batch, so more steps can mean a longer way from the start)
OUR_BATCHES = {
    "equal-tokens": lambda tokens_per_step, bs: {"batch_tokens": tokens_per_step, "max_batch_size": 4 * bs},
    "recipe-steps": lambda tokens_per_step, bs: {"batch_tokens": 10**9, "max_batch_size": bs},
}


def bench_generation(name, B, args, common: dict, init_dir, base_tok, test_rows, work, dev, n_gen, n_base_gen
                     ) -> tuple[dict, dict]:
    """Our greedy and beam generation with the method's untrained adapter attached, and the recipe's greedy
    generate where it times one; returns the method's row so far and the recipe's generation rate."""
    on_gpu = dev.type == "cuda"
    row = {}
    # --- generation speed on the untrained model with the method attached: equal work for both recipes,
    # since a random model almost never emits EOS and every prompt runs to the new-token limit. Timed before
    # any training in the process: after the trainings, the recipe's LoRA generation (which casts every frozen
    # fp32 weight to bf16 at each step) ran at a third of its speed in a fresh process (32.6 against 90-112 new
    # tokens/s on the 2-core CPU, 2026-11-28), so with several --methods only the first is timed fresh
    gen_config = build_config({**common, "output_dir": str(work / name / "gen")})
    dtype = compute_dtype(gen_config, dev)  # as training and test mode choose it (bf16 where the hardware has it)
    loaded = load_for_training(gen_config, dev, dtype)
    loaded.model.to(dtype)  # test mode holds the whole model in the compute dtype
    fold_adapter_for_generation(loaded, args.merge_adapter)  # and folds LoRA / IA3 in where it does
    loaded.model.set_attn_implementation("sdpa")  # and its attention: the CPU's fp32 attention is for training
    row["gen_adapter_merged"], row["gen_adapter_fold_error"] = loaded.adapter_merged, loaded.fold_error
    prompts = [r["src"] for r in test_rows[:n_gen]]

    # the median of a few timings, for both recipes: one generation timing on the shared 2-core machine
    # varied by about ±20% within minutes
    repeats = args.gen_repeats or (1 if on_gpu else 3)

    def warm_up(settings) -> None:  # kernel loading, allocator growth: outside the timing, for both recipes
        generate(loaded.model, loaded.tokenizer, loaded.prompter, prompts[:8],
                 dataclasses.replace(settings, max_new_tokens=4), dev, dtype, show_progress=False)

    def time_ours(settings, sources=prompts) -> dict:
        return generate(loaded.model, loaded.tokenizer, loaded.prompter, sources, settings, dev, dtype,
                        show_progress=False)[1]

    def timed_generation(settings, sources=prompts) -> dict:
        warm_up(settings)
        return _median_run([time_ours(settings, sources) for _ in range(repeats)])

    # no n-gram blocking: the recipe has none, and equal work needs every prompt to run to the limit
    greedy = dataclasses.replace(decoding(gen_config, on_gpu), search="greedy", no_repeat_ngram=0,
                                 greedy_loop=args.greedy_loop)
    # ours' greedy generation and the recipe's in alternating rounds, so that a drift of the shared machine's
    # speed (ours' greedy rate moved from 375 to 295-328 new tokens/s between two runs on the 2-core CPU,
    # 2026-11-28) touches both sides of the ratio alike
    recipe_model = _recipe_model(B, name, init_dir, dev) if name in RECIPE_TIMES_GENERATION else None
    warm_up(greedy)
    if recipe_model is not None:
        B.generate(recipe_model, base_tok, "dialogue", test_rows[:8])
    ours_runs, recipe_rates = [], []
    for _ in range(repeats):
        ours_runs.append(time_ours(greedy))
        if recipe_model is not None:
            recipe_rates.append(round(B.generate(recipe_model, base_tok, "dialogue", test_rows[:n_base_gen])[1], 1))
    row["ours_gen_greedy"] = _median_run(ours_runs)
    recipe_generation = _median_run([{"gen_tokens_per_s": rate} for rate in recipe_rates],
                                    "gen_tokens_per_s") if recipe_rates else {}
    del recipe_model
    if args.also_greedy_loop:  # the other loop in the same process, for a ratio
        row[f"ours_gen_greedy_{args.also_greedy_loop}_loop"] = timed_generation(
            dataclasses.replace(greedy, greedy_loop=args.also_greedy_loop))
    if args.also_decode_attention:
        row[f"ours_gen_greedy_{args.also_decode_attention}_attention"] = timed_generation(
            dataclasses.replace(greedy, decode_attention=args.also_decode_attention))
    if args.cudnn_attention_too:
        row["ours_gen_greedy_cudnn_attention"] = timed_generation(dataclasses.replace(greedy, cudnn_attention=True))
    row["ours_gen_beam"] = timed_generation(dataclasses.replace(greedy, search="beam"), prompts[:args.beam_prompts])
    loaded = None  # its memory, before the trainings
    torch.cuda.empty_cache() if on_gpu else None
    return row, recipe_generation


def bench_method(name, B, args, seeds, init_dir, config, base_tok, base_train, base_valid, valid_rows, test_rows,
                 bench_data, recipe_data, work, dev, bs, base_steps, our_steps, n_gen, n_base_gen, real_per_example,
                 equal_tokens_per_step) -> dict:
    on_gpu = dev.type == "cuda"
    method = get_method(name)
    common = _our_settings(B, name, init_dir, bench_data, args)
    row, recipe_generation = bench_generation(name, B, args, common, init_dir, base_tok, test_rows, work, dev,
                                              n_gen, n_base_gen)
    # --- baseline: the reference recipe as written
    quality_rows = test_rows[: args.quality_prompts]
    row["baseline"] = recipe_quality_seeds(B, name, seeds, init_dir, base_tok, base_train, base_valid, quality_rows,
                                           dev, bs, base_steps, real_per_example)
    row["baseline"].update(recipe_generation)
    torch.cuda.empty_cache() if on_gpu else None

    row["ours_equal"] = ours_equal_budget_seeds(B, name, seeds, common, recipe_data, work, equal_tokens_per_step,
                                                bs, valid_rows, quality_rows, dev, base_tok)

    # --- ours at the device's default batch: the speed a user gets
    default = build_config({**common, "output_dir": str(work / name / "default"), "max_steps": our_steps,
                            "learning_rate": RECIPE_LEARNING_RATE, "eval_every": 10**9, "max_valid_examples": 8})
    reset_peak_memory(dev)
    record = train(default)
    row_loss = record["history"][-1]["train_loss"]
    row["ours"] = {"tokens_per_s": record["steady_tokens_per_s"], "peak_memory_gb": record["peak_memory_gb"],
                   "tokens_per_step": round(record["train_tokens"] / record["steps"]),
                   "trainable_params": record["trainable_params"]}
    compiled = dataclasses.replace(default, compile=True, output_dir=str(work / name / "compiled"))
    will_compile, why_not = use_compiled_blocks(compiled, method, dev, our_steps)
    if args.compile and not will_compile:
        row["ours_compiled"] = {"skipped": why_not}
    elif args.compile:  # the same run with compiled blocks: its first steps (compilation) fall in the warm-up
        try:
            record = train(compiled)
        except Exception as err:  # a compiler failure on this card must not cost the method's other numbers
            row["ours_compiled"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        else:
            row["ours_compiled"] = {"tokens_per_s": record["steady_tokens_per_s"],
                                    "peak_memory_gb": record["peak_memory_gb"],
                                    "first_step_s": record["step_times"][0][0],
                                    "train_loss_last": record["history"][-1]["train_loss"],
                                    "train_loss_last_eager": row_loss}
            row["compile_speedup"] = round(record["steady_tokens_per_s"] / row["ours"]["tokens_per_s"], 2)
    if args.cudnn_attention_too:  # the same run with cuDNN attention allowed
        record = train(dataclasses.replace(default, cudnn_attention=True,
                                           output_dir=str(work / name / "cudnn_attention")))
        row["ours_cudnn_attention"] = {"tokens_per_s": record["steady_tokens_per_s"],
                                       "peak_memory_gb": record["peak_memory_gb"],
                                       "train_loss_last": record["history"][-1]["train_loss"],
                                       "train_loss_last_without": row_loss}
        row["no_cudnn_attention_speedup"] = {
            "train": round(row["ours"]["tokens_per_s"] / record["steady_tokens_per_s"], 2),
            "generate_greedy": round(row["ours_gen_greedy"]["new_tokens_per_s"]
                                     / row["ours_gen_greedy_cudnn_attention"]["new_tokens_per_s"], 2)}
    if args.profile_steps:  # apart from the timed runs: the profiler's overhead must not enter their rates
        variants = [("eager", default)] + ([("compiled", compiled)] if "tokens_per_s" in row.get(
            "ours_compiled", {}) else [])
        row["profiles"] = {variant: _profile(run, work / name / f"profile-{variant}", args, name, variant)
                           for variant, run in variants}
    fpt = flops_per_token(config, name == "none")
    if on_gpu:
        peak_flops = 989e12  # dense bf16 spec of the H100 SXM and the H200
        row["ours"]["mfu"] = round(row["ours"]["tokens_per_s"] * fpt / peak_flops, 4)
        row["baseline"]["mfu"] = round(row["baseline"]["tokens_per_s"] * fpt / peak_flops, 4)
    row["train_speedup"] = round(row["ours"]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
    row["train_speedup_equal_tokens_per_step"] = round(
        row["ours_equal"]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
    row.update(_generation_speedup(row, row["baseline"]))
    return row


def generation_only_row(row: dict, recipe_generation: dict) -> dict:
    """A --generation-only file's row for a method: ``bench_generation``'s, the recipe's rate and the ratio."""
    return {**row, "baseline": recipe_generation, **_generation_speedup(row, recipe_generation)}


def _generation_speedup(row: dict, recipe_generation: dict) -> dict:
    if "gen_tokens_per_s" not in recipe_generation:  # the recipe times generation for some methods only
        return {}
    return {"gen_speedup_greedy": round(row["ours_gen_greedy"]["new_tokens_per_s"]
                                        / recipe_generation["gen_tokens_per_s"], 2)}


def recipe_quality_seeds(B, name: str, seeds: list[int], init_dir: Path, base_tok, base_train: list[dict],
                         base_valid: list[dict], quality_rows: list[dict], dev, bs: int, base_steps: int,
                         real_per_example: float | None = None) -> dict:
    """The reference recipe trained once per seed (seed 0: as written): its run-to-run spread, the noise "same
    quality" is measured against (other data orders, initial adapters and dropout masks). The first seed's run
    also gives its speed, when ``real_per_example`` is given, and peak memory on a GPU."""
    method = get_method(name)
    runs = []
    for seed in seeds:
        model, timer = _train_recipe(B, name, init_dir, base_tok, base_train, bs, base_steps, dev, seed or None)
        run = {"seed": seed}
        if real_per_example is not None and not runs:
            run["tokens_per_s"] = round(timer.steps * bs * real_per_example / (timer.t1 - timer.t0))
            run["peak_memory_gb"] = B.peak() if dev.type == "cuda" else None
        runs.append({**run, **_recipe_quality(B, model, base_tok, base_valid, quality_rows, dev, method)})
        del model
    return _first_with_other_seeds(runs)


def ours_equal_budget_seeds(B, name: str, seeds: list[int], common: dict, recipe_data: Path, work: Path,
                            equal_tokens_per_step: int, bs: int, valid_rows: list[dict], quality_rows: list[dict],
                            dev, tokenizer, batches: str = "equal-tokens") -> dict:
    """Ours at the recipe's tokens per step, learning rate and schedule, on its examples, once per seed (initial
    adapter, batch order): the quality set beside the recipe's (until 2026-11-28 on a random subset of the train
    split of the same size, a different one per seed, and with our default schedule). The first seed's run also
    gives the speed and peak memory at equal tokens per step. ``batches``: see ``OUR_BATCHES``."""
    sizes = OUR_BATCHES[batches](equal_tokens_per_step, bs)
    equal = build_config({**common, "data_dir": str(recipe_data), "output_dir": str(work / name / "equal"),
                          "epochs": 1, **sizes,
                          "learning_rate": RECIPE_LEARNING_RATE, **_recipe_schedule(B), "eval_every": 10**9})
    runs = []
    for seed in seeds:
        run = dataclasses.replace(equal, seed=seed, output_dir=str(work / name / f"equal-seed{seed}"))
        reset_peak_memory(dev)
        record = train(run)
        speed = {} if runs else {"tokens_per_s": record["steady_tokens_per_s"],
                                 "peak_memory_gb": record["peak_memory_gb"], "steps": record["steps"],
                                 "train_tokens": record["train_tokens"]}
        runs.append({"seed": seed, **speed,
                     **_equal_budget_quality(run, valid_rows, quality_rows, dev, B, tokenizer)})
    return _first_with_other_seeds(runs)


def _first_with_other_seeds(runs: list[dict]) -> dict:
    """The results files' shape for one side's seeds: the first run, with the others under "other_seeds"."""
    return {**runs[0], **({"other_seeds": runs[1:]} if len(runs) > 1 else {})}


def _recipe_model(B, name: str, init_dir: Path, dev, seed: int = 0):
    """The model as the recipe builds it: the weights, then its adapter for ``name`` (initialised under ``seed``)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(init_dir).to(dev)
    peft_config = B.peft_cfg(name)
    return model if peft_config is None else get_peft_model(model, peft_config)


def _train_recipe(B, name: str, init_dir: Path, tokenizer, features: list[dict], batch_size: int, steps: int, dev,
                  seed: int | None = None):
    """The reference recipe's training as written; with a seed, the same but for its seed: the Trainer's (data
    order, dropout) and the one before attaching the adapter (its initial weights). Returns (model, timer)."""
    model = _recipe_model(B, name, init_dir, dev, seed or 0)
    written = B.TrainingArguments
    if seed is not None:  # the recipe takes no seed argument: give its TrainingArguments one
        B.TrainingArguments = functools.partial(written, seed=seed, data_seed=seed)
    try:
        _, _, timer = B.train(model, tokenizer, features, batch_size, steps=steps)
    finally:
        B.TrainingArguments = written
    return model, timer


# the recipe's weights decoded by its generate with our generation mends (Method.prepare_for_generation)
MENDED_SCORES = "test_scores_with_our_generation_mends"


def _recipe_quality(B, model, tokenizer, valid_features: list[dict], quality_rows: list[dict], dev,
                    method: Method) -> dict:
    """Validation loss and test scores of a model the recipe trained, decoded by the recipe's own generate; for a
    method whose generation peft-nlg mends (``Method.prepare_for_generation``), the same weights decoded again
    with the mends, as our weights are in ``_equal_budget_quality``'s recipe decoding, so that the two trainings
    can be compared on equal decoding."""
    quality = {"valid_loss": round(answer_loss(model, tokenizer, valid_features, dev), 4),
               "test_scores": _recipe_generate_scores(B, model, tokenizer, quality_rows)}
    if method.prepare_for_generation is not None:
        method.ready_for_generation(model)
        quality[MENDED_SCORES] = _recipe_generate_scores(B, model, tokenizer, quality_rows)
    return quality


def _recipe_generate_scores(B, model, tokenizer, quality_rows: list[dict]) -> dict:
    """The scores of the recipe's own ``generate``, or the error it raised (its docstring says it crashes with
    prefix tuning; with transformers 5.24 and peft 0.21.2 it drops the trained prefix instead, 2026-12-07)."""
    try:
        replies, _ = B.generate(model, tokenizer, "dialogue", quality_rows)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return _scores(replies, quality_rows)


def _equal_budget_quality(config, valid_rows: list[dict], quality_rows: list[dict], dev, B, tokenizer) -> dict:
    """Validation loss and test scores of a run trained at the recipe's budget, decoded with the recipe's settings
    (greedy, 64 new tokens, no n-gram block) by test mode (bf16 weights where the hardware has bf16); and the same
    trained weights decoded by the recipe's own ``generate`` (fp32 weights under bf16 autocast; loaded as test mode
    loads them, so with our generation mends where a method has any, and the recipe's weights are decoded with them
    too, ``MENDED_SCORES``), so that only the training differs from the recipe's scores: in bf16 the decoding
    path alone moved the untrained model's ROUGE-L on 100 dialogue prompts between 7.74 and 8.23 (2026-11-28)."""
    dtype = compute_dtype(config, dev)  # as training and test mode choose it (bf16 where the hardware has it)
    loaded = load_trained(config.out, config, dev, dtype)
    valid = [loaded.prompter.encode(r) for r in valid_rows]
    same_decoding = dataclasses.replace(decoding(config, dev.type == "cuda"), search="greedy", max_new_tokens=64,
                                        no_repeat_ngram=0)
    replies, _ = generate(loaded.model, loaded.tokenizer, loaded.prompter, [r["src"] for r in quality_rows],
                          same_decoding, dev, dtype, show_progress=False)
    quality = {"dtype": str(dtype).removeprefix("torch."),
               "valid_loss": round(answer_loss(loaded.model, loaded.tokenizer, valid, dev), 4),
               "test_scores": _scores(replies, quality_rows)}
    as_trained = load_trained(config.out, dataclasses.replace(config, merge_adapter="no"), dev, torch.float32)
    # the loss as the recipe scores its own model: fp32 weights (under bf16 autocast on a GPU), so that on a CPU
    # the comparison is not between fp32 and bf16 arithmetic
    quality["valid_loss_recipe_evaluation"] = round(answer_loss(as_trained.model, as_trained.tokenizer, valid, dev), 4)
    # loaded as test mode loads it: with our generation mends (Method.prepare_for_generation) where a method has any
    quality["test_scores_recipe_decoding"] = _recipe_generate_scores(B, as_trained.model, tokenizer, quality_rows)
    return quality


def _scores(replies: list[str], rows: list[dict]) -> dict:
    scores = TASKS["dialogue"].metrics(replies, [r["trg"] for r in rows])
    return {k: scores[k] for k in ("rougeL", "bleu", "distinct2", "mean_len")}


def _quality(scores: dict) -> str:
    return "error" if "error" in scores else f"{scores['rougeL']:.2f}"


# what must agree for results measured in separate calls to stand in one table
_SETUP = ("device", "versions", "weights", "arch", "baseline_batch", "baseline_steps", "real_tokens_per_example",
          "equal_tokens_per_step", "gen_prompts", "gen_timing", "prompt", "equal_budget_examples",
          "equal_budget_schedule", "our_precision")


def merge_results(parts: list[dict], names: list[str]) -> dict:
    """One results file from several runs of the same setup (same card, versions, weights, sizes) that measured
    different methods: a GPU slot's calls are limited to 10 minutes each. Every ratio stays the one measured in
    its own run; the file lists where each method came from."""
    setup = (*_SETUP, "only")  # a generation-only file joins only its own kind
    merged = {key: parts[0].get(key) for key in setup}
    merged.update(date=sorted({p["date"] for p in parts})[-1], methods={}, merged_from={})
    for part, name in zip(parts, names, strict=True):
        differing = [key for key in setup if part.get(key) != merged[key]]
        if differing:
            raise ValueError(f"{name}: measured with another {', '.join(differing)} than {names[0]}")
        twice = set(part["methods"]) & set(merged["methods"])
        if twice:
            raise ValueError(f"{name}: {', '.join(sorted(twice))} measured in two of the files")
        merged["methods"].update(part["methods"])
        merged["merged_from"].update({method: f"{Path(name).name} ({part['date']})" for method in part["methods"]})
    if merged["only"] is None:  # timed runs: a file without the key
        del merged["only"]
    return merged


# what a side's run keeps in a pooled quality check: its quality, not its speed (timed in one run only)
_QUALITY_KEYS = ("seed", "dtype", "valid_loss", "valid_loss_recipe_evaluation", "test_scores", MENDED_SCORES,
                 "test_scores_recipe_decoding")
# the sides of a method's row that hold quality checks: the recipe's and ours at its tokens per step
_SIDES = ("baseline", "ours_equal")


def pool_seeds(parts: list[dict], names: list[str]) -> dict:
    """One quality-only results file from the quality checks of several runs of one setup (timed runs or
    --quality-only runs, other seeds each): every side of every method gets the union of the runs' seeds. A seed
    found in two files must be the same training (validation loss within 0.001: on a CPU a seed repeats to the
    fourth decimal); its scores are joined, the first file's kept where both have one. Each seed's run says which
    file it came from."""
    setup = [key for key in _SETUP if key not in ("gen_prompts", "gen_timing", "our_precision")]
    pooled = {key: parts[0].get(key) for key in setup}
    pooled.update(only="the quality check, pooled from several runs (--pool)", methods={},
                  date=sorted({p["date"] for p in parts})[-1],
                  pooled_from=[f"{Path(name).name} ({part['date']})" for part, name in zip(parts, names, strict=True)])
    ours_from = None  # (the variant of ours, its file) of the first file with a side of ours
    for part, name in zip(parts, names, strict=True):
        differing = [key for key in setup + ["quality_prompts", "valid_examples"]
                     if part.get(key) != pooled.get(key) and key in part and key in pooled]
        if differing:
            raise ValueError(f"{name}: measured with another {', '.join(differing)} than {names[0]}")
        for key in ("quality_prompts", "valid_examples"):  # recorded since the 40th session
            if key in part:
                pooled.setdefault(key, part[key])
        for method, row in part["methods"].items():
            for side in _SIDES:
                if side not in row:
                    continue
                if side == "ours_equal":  # ours in one variant only: another precision is another training
                    variant = _our_variant(part)
                    ours_from = ours_from or (variant, name)
                    if variant != ours_from[0]:
                        raise ValueError(f"{name}: ours at {_variant_text(variant)}, but {ours_from[1]} at "
                                         f"{_variant_text(ours_from[0])}")
                seeds = pooled["methods"].setdefault(method, {}).setdefault(side, {})
                for run in _seed_runs(row[side]):
                    run = {key: run[key] for key in _QUALITY_KEYS if key in run} | {"from": Path(name).name}
                    earlier = seeds.get(run["seed"])
                    if earlier is None:
                        seeds[run["seed"]] = run
                    elif abs(earlier["valid_loss"] - run["valid_loss"]) > 1e-3:
                        raise ValueError(f"{name}: {method}, {side}, seed {run['seed']}: validation loss "
                                         f"{run['valid_loss']} against {earlier['valid_loss']} in {earlier['from']}")
                    else:
                        seeds[run["seed"]] = run | earlier | {"from": f"{earlier['from']} + {run['from']}"}
    if ours_from:
        pooled["our_precision"], pooled["our_batches"] = ours_from[0]
    for row in pooled["methods"].values():
        for side, seeds in row.items():
            row[side] = _first_with_other_seeds([seeds[seed] for seed in sorted(seeds)])
    return pooled


def _our_variant(results: dict) -> tuple[str, str]:
    """(--precision, --our-batches) of a file's runs of ours (files before the 40th session: equal tokens)."""
    return results["our_precision"], results.get("our_batches", "equal-tokens")


def _variant_text(variant: tuple[str, str]) -> str:
    return f"--precision {variant[0]} --our-batches {variant[1]}"


def _seed_runs(side: dict) -> list[dict]:
    """A side's runs, each with its seed (files before the 40th session name no seed for the first run: 0)."""
    return [{"seed": 0, **side}, *side.get("other_seeds", [])]


def _repeat_rates(rates: list[float]) -> dict:
    return {"repeat_rates": rates} if len(rates) > 1 else {}


def _median_run(runs: list[dict], rate: str = "new_tokens_per_s") -> dict:
    """The statistics of the median timing by ``rate``, with every timing's rate."""
    runs = sorted(runs, key=lambda run: run[rate])
    return {**runs[len(runs) // 2], **_repeat_rates([run[rate] for run in runs])}


def _recipe_prompt(B) -> dict:
    """Our settings that give the recipe's prompt, token for token: its instruction on the line before the
    conversation in the user turn, under the chat template's default system turn. Our default (the
    instruction as the system turn) scored a point of ROUGE-L less with LoRA after the recipe's 14 CPU steps
    (7.03-7.42 against 8.27-8.32), and the recipe's prompt gave ours 7.99 and 8.31 (2026-11-27)."""
    return {"instruction": B.INSTR["dialogue"], "instruction_turn": "user"}


def _recipe_schedule(B) -> dict:
    """Our settings for the recipe's learning-rate schedule, read from its `train` (its warm-up steps and
    transformers' scheduler name): like the learning rate, a schedule is a choice of training, not a speed lever.
    Our default (5% of the steps to warm up, then linear decay) warms up for one step of the recipe's budget,
    which cost full fine-tuning about 0.05 of validation loss on the real weights (three seeds, 2026-11-28)."""
    source = inspect.getsource(B.train)
    warmup = re.search(r"warmup_steps\s*=\s*(\d+)", source)
    schedule = re.search(r"lr_scheduler_type\s*=\s*[\"'](\w+)[\"']", source)
    if warmup is None or schedule is None:
        raise ValueError("the recipe's train() no longer names warmup_steps= and lr_scheduler_type=: "
                         "set its schedule in benchmarks/speed.py by hand")
    return {"warmup_steps": int(warmup.group(1)), "lr_schedule": schedule.group(1)}


def _baseline_like_options(name: str) -> dict:
    """The reference recipe's method settings, so both train the same adapter."""
    return {"lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
            "prefix_tuning": {"num_virtual_tokens": 20, "init": "random"},
            "p_tuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 256},
            "prompt_tuning": {"num_virtual_tokens": 20, "init": "random"},
            "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
            }.get(name, {})


def markdown_table(results: dict) -> str:
    """The docs/benchmarks.md table, generated from a results JSON (never typed by hand)."""
    if results.get("only") == GENERATION_ONLY:
        return generation_table(results)
    if "only" in results:
        return quality_table(results)
    compiled = any("compile_speedup" in r for r in results["methods"].values())
    cudnn = any("no_cudnn_attention_speedup" in r for r in results["methods"].values())
    recipe_decoding = any("test_scores_recipe_decoding" in r.get("ours_equal", {}) for r in results["methods"].values())
    mended = any(MENDED_SCORES in r.get("baseline", {}) for r in results["methods"].values())
    lines = ["| method | base tok/s | ours tok/s | × | mem base GB | mem ours@equal GB | valid loss base / ours@equal "
             "| test ROUGE-L base / ours@equal |"
             + (" test ROUGE-L base, decoded with our generation mends |" if mended else "")
             + (" test ROUGE-L ours@equal, the recipe's decoding |" if recipe_decoding else "")
             + " gen base | gen ours greedy | × | beam ours |"
             + (" compiled tok/s (× base, × eager) |" if compiled else "")
             + (" ours with cuDNN attention: train / gen tok/s (ours ×) |" if cudnn else ""),
             "|" + "---|" * (12 + mended + recipe_decoding + compiled + cudnn)]
    for name, r in results["methods"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} |" + " |" * (9 + mended + recipe_decoding))
            continue
        b, o, e = r["baseline"], r["ours"], r["ours_equal"]
        gen_base = f"{b['gen_tokens_per_s']:,.0f}" if "gen_tokens_per_s" in b else "–"
        lines.append(" | ".join([
            f"| {name}", f"{b['tokens_per_s']:,.0f}", f"{o['tokens_per_s']:,.0f}", f"**{r['train_speedup']}**",
            str(b["peak_memory_gb"] or "–"), str(e["peak_memory_gb"]),
            _valid_cell(b, e),
            _test_cell(b, e), *([_mended_cell(b)] if mended else []),
            *([_recipe_decoding_cell(e)] if recipe_decoding else []),
            gen_base, f"{r['ours_gen_greedy']['new_tokens_per_s']:,.0f}",
            f"**{r.get('gen_speedup_greedy', '–')}**",
            f"{r['ours_gen_beam']['new_tokens_per_s']:,.0f} |"]) + (
            _compiled_cell(r) if compiled else "") + (
            _cudnn_cell(r) if cudnn else ""))
    return "\n".join(lines)


def generation_table(results: dict) -> str:
    """The table of a generation-only results file: per method, the recipe's and our greedy new tokens/s (the
    median of the timed rounds), their ratio, our beam search, and the attention our decoding steps ran on."""
    lines = ["| method | gen base | gen ours greedy | × | beam ours | ours' rounds, tok/s | decoding attention |",
             "|" + "---|" * 7]
    for name, r in results["methods"].items():
        greedy = r["ours_gen_greedy"]
        gen_base = f"{r['baseline']['gen_tokens_per_s']:,.0f}" if "gen_tokens_per_s" in r["baseline"] else "–"
        rounds = " / ".join(f"{rate:,.1f}" for rate in greedy.get("repeat_rates", []))
        lines.append(f"| {name} | {gen_base} | {greedy['new_tokens_per_s']:,.0f} | "
                     f"**{r.get('gen_speedup_greedy', '–')}** | {r['ours_gen_beam']['new_tokens_per_s']:,.0f} | "
                     f"{rounds or '–'} | {greedy['decode_attention']} |")
    return "\n".join(lines)


def quality_table(results: dict) -> str:
    """The table of a quality-only results file (--quality-only, --pool): a row per method and side, each value
    the mean over the side's seeds with their lowest and highest. The columns that compare the trainings alone:
    the validation loss as the recipe evaluates its model (fp32 weights), and the test scores of both sides'
    weights decoded alike, by the recipe's generate with our generation mends where the method has any."""
    lines = ["| method | trained by | seeds | valid loss, fp32 evaluation | test ROUGE-L, decoded alike (the recipe's "
             "generate, our mends) | reply length (words) | test ROUGE-L, each side's own decoding "
             "| reply length (words) |", "|" + "---|" * 8]
    differences = []
    for name, row in results["methods"].items():
        compared = {}  # side: (validation losses, ROUGE-L decoded alike), one value per seed
        for side, run in row.items():
            runs = _seed_runs(run)
            who, loss, alike, own = _side_columns(results, side, runs)
            compared[side] = ([r.get(loss) for r in runs], [r.get(alike, {}).get("rougeL") for r in runs])
            lines.append(" | ".join([
                f"| {name}", who, _seed_list([r["seed"] for r in runs]),
                _mean_spread(compared[side][0], 3),
                _mean_spread(compared[side][1], 2),
                _mean_spread([r.get(alike, {}).get("mean_len") for r in runs], 1),
                _mean_spread([r.get(own, {}).get("rougeL") for r in runs], 2),
                _mean_spread([r.get(own, {}).get("mean_len") for r in runs], 1)]) + " |")
        if len(compared) == 2:
            differences += _seed_differences(name, compared["ours_equal"], compared["baseline"])
    return "\n".join(lines + ([""] + differences if differences else []))


def _side_columns(results: dict, side: str, runs: list[dict]) -> tuple[str, str, str, str]:
    """Who trained a side of a quality-only file (its runs, ``_seed_runs``), and the keys of its validation loss as
    the recipe evaluates (fp32 weights), of its test scores decoded alike (the recipe's generate, our mends), and of
    its own decoding's."""
    if side == "baseline":
        # where nothing of the method's generation is mended, the recipe's one decoding is the alike one
        return "the recipe", "valid_loss", MENDED_SCORES if MENDED_SCORES in runs[0] else "test_scores", "test_scores"
    how = sorted({r["dtype"] for r in runs if "dtype" in r})  # files before the 40th session: none
    if results.get("our_batches") == "recipe-steps":
        how.append("the recipe's steps")
    who = f"ours ({', '.join(how)})" if how else "ours"
    return who, "valid_loss_recipe_evaluation", "test_scores_recipe_decoding", "test_scores"


def seed_table(results: dict) -> str:
    """Seed by seed (--render --by-seed), for a quality-only file: per method, the validation loss as the recipe
    evaluates and ROUGE-L decoded alike of every seed of each side, with the side's mean ± standard deviation."""
    blocks = []
    for name, row in results["methods"].items():
        by_side = {side: {r["seed"]: r for r in _seed_runs(run)} for side, run in row.items()}
        seeds = sorted(set().union(*by_side.values()))
        lines = [f"| {name} | " + " | ".join(map(str, seeds)) + " | mean ± sd |", "|" + "---|" * (len(seeds) + 2)]
        for side, runs in by_side.items():
            who, loss, alike, _ = _side_columns(results, side, list(runs.values()))
            for what, values, decimals in (
                    ("valid loss", {seed: r.get(loss) for seed, r in runs.items()}, 3),
                    ("ROUGE-L", {seed: r.get(alike, {}).get("rougeL") for seed, r in runs.items()}, 2)):
                known = [v for v in values.values() if v is not None]
                cells = ["–" if values.get(seed) is None else f"{values[seed]:.{decimals}f}" for seed in seeds]
                spread = (f"{statistics.fmean(known):.{decimals}f} ± {statistics.stdev(known):.{decimals}f}"
                          if len(known) > 1 else "–")
                lines.append(f"| {who}, {what} | " + " | ".join(cells) + f" | {spread} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _seed_differences(name: str, ours: tuple[list, list], recipe: tuple[list, list]) -> list[str]:
    """Under a quality-only table, for a method with both sides: ours' mean minus the recipe's, for the two columns
    that compare the trainings alone, with its standard error from both sides' seed-to-seed spreads (Welch's, as
    the sides' spreads need not be alike) and how many of those standard errors the gap is. It says how far apart
    the means are against run-to-run noise; it is no proof of sameness."""
    lines = []
    for column, ours_values, recipe_values, decimals in (("valid loss, fp32 evaluation", ours[0], recipe[0], 3),
                                                         ("test ROUGE-L, decoded alike", ours[1], recipe[1], 2)):
        ours_values = [v for v in ours_values if v is not None]
        recipe_values = [v for v in recipe_values if v is not None]
        if len(ours_values) < 2 or len(recipe_values) < 2:
            continue
        mean_ours, mean_recipe = statistics.fmean(ours_values), statistics.fmean(recipe_values)
        sd_ours, sd_recipe = statistics.stdev(ours_values), statistics.stdev(recipe_values)
        error = math.sqrt(sd_ours ** 2 / len(ours_values) + sd_recipe ** 2 / len(recipe_values))
        difference = mean_ours - mean_recipe
        in_errors = f"{abs(difference) / error:.1f}" if error else "–"
        lines.append(f"- {name}, {column}: ours {mean_ours:.{decimals}f} ± {sd_ours:.{decimals}f} "
                     f"({len(ours_values)} seeds), the recipe {mean_recipe:.{decimals}f} ± {sd_recipe:.{decimals}f} "
                     f"({len(recipe_values)} seeds), mean ± sd; ours − the recipe {difference:+.{decimals}f}, "
                     f"standard error {error:.{decimals}f} ({in_errors} standard errors)")
    return lines


def _seed_list(seeds: list[int]) -> str:
    """'0–7' for a run of consecutive seeds, else '0, 2, 5'."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _mean_spread(values: list[float | None], decimals: int) -> str:
    """'mean (lowest–highest, N seeds)' of the seeds that have a value ('–' where none has: a failed decoding, or
    a file from before the value was recorded)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{sum(values) / len(values):.{decimals}f}{_spread(values, decimals)}"


def _profile(run: RunConfig, run_dir: Path, args, name: str, variant: str) -> str:
    """Profiles ``args.profile_steps`` steps of ``run`` (after its warm-up steps) and copies the op table next
    to the results JSON; returns the table's first line (steps, wall time, how busy the device was)."""
    steps = args.profile_steps + 5 + 1 + 1  # the profiler's wait and warm-up steps, and one to close it
    train(dataclasses.replace(run, output_dir=str(run_dir), max_steps=steps, profile_steps=args.profile_steps))
    table = (run_dir / "profile.txt").read_text(encoding="utf-8")
    out = Path(args.out)
    (out.parent / f"{out.stem}-{name}-{variant}-profile.txt").write_text(table, encoding="utf-8")
    return table.splitlines()[0]


def _compiled_cell(row: dict) -> str:
    compiled = row.get("ours_compiled")
    if compiled is None:
        return " – |"
    if "error" in compiled:
        return f" failed: {compiled['error'][:60]} |"
    if "skipped" in compiled:
        return f" not run: {compiled['skipped'][:60]} |"
    over_base = round(compiled["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
    return f" {compiled['tokens_per_s']:,.0f} (**{over_base}**, {row['compile_speedup']}) |"


def _cudnn_cell(row: dict) -> str:
    if "no_cudnn_attention_speedup" not in row:
        return " – |"
    speedup = row["no_cudnn_attention_speedup"]
    return (f" {row['ours_cudnn_attention']['tokens_per_s']:,.0f} / "
            f"{row['ours_gen_greedy_cudnn_attention']['new_tokens_per_s']:,.0f} "
            f"({speedup['train']} / {speedup['generate_greedy']}) |")


def _test_cell(base: dict, ours: dict) -> str:
    """Older result files have no quality check."""
    if "test_scores" not in ours:
        return "–"
    return f"{_rouge_cell(base, 'test_scores')} / {_rouge_cell(ours, 'test_scores')}"


def _mended_cell(base: dict) -> str:
    """The recipe's trained weights decoded by its generate with our mends (methods whose generation has any)."""
    return _rouge_cell(base, MENDED_SCORES) if MENDED_SCORES in base else "–"


def _recipe_decoding_cell(ours: dict) -> str:
    """Our trained weights decoded by the recipe's generate: the training compared alone."""
    return _rouge_cell(ours, "test_scores_recipe_decoding") if "test_scores_recipe_decoding" in ours else "–"


def _rouge_cell(run: dict, scores: str) -> str:
    """ROUGE-L of ``run[scores]`` with its spread over seeds; a failed decoding counts for no seed."""
    def rouge(seed_run):
        return seed_run.get(scores, {}).get("rougeL")
    return f"{_quality(run[scores])}{_seed_spread(run, rouge, 2)}"


def _valid_cell(base: dict, ours: dict) -> str:
    def loss(run):
        return run["valid_loss"]
    def loss_as_the_recipe_evaluates(run):
        return run.get("valid_loss_recipe_evaluation")
    cell = (f"{base['valid_loss']:.3f}{_seed_spread(base, loss, 3)} / "
            f"{ours['valid_loss']:.3f}{_seed_spread(ours, loss, 3)}")
    if "valid_loss_recipe_evaluation" in ours:  # since 2026-11-28 (25th session)
        cell += (f"; ours evaluated as the recipe evaluates its own: {ours['valid_loss_recipe_evaluation']:.3f}"
                 f"{_seed_spread(ours, loss_as_the_recipe_evaluates, 3)}")
    return cell


def _seed_spread(run: dict, value, decimals: int) -> str:
    """' (lowest–highest of N seeds)' where a recipe trained with other seeds too, else nothing."""
    return _spread([value(seed_run) for seed_run in _seed_runs(run)], decimals)


def _spread(values: list[float | None], decimals: int) -> str:
    """' (lowest–highest, N seeds)' of the values given (None: a seed without one), where there are two or more."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f" ({min(values):.{decimals}f}–{max(values):.{decimals}f}, {len(values)} seeds)"


def print_table(results: dict) -> None:
    dev = results["device"].get("gpu") or results["device"]["cpu"]
    print(f"\n{dev}, {results['date']}; baseline batch {results['baseline_batch']} "
          f"(~{results['equal_tokens_per_step']} real tokens/step)")
    head = ("method", "base tok/s", "ours tok/s", "x", "ours@equal", "x", "mem base", "mem ours@eq",
            "vloss base/ours", "test rougeL base/ours", "gen base", "gen ours", "x", "beam ours")
    print(" | ".join(head))
    for name, r in results["methods"].items():
        if "error" in r:
            print(f"{name} | error: {r['error']}")
            continue
        b, o, e = r["baseline"], r["ours"], r["ours_equal"]
        print(" | ".join(str(x) for x in (
            name, b["tokens_per_s"], o["tokens_per_s"], r["train_speedup"], e["tokens_per_s"],
            r["train_speedup_equal_tokens_per_step"], b["peak_memory_gb"], e["peak_memory_gb"], _valid_cell(b, e),
            _test_cell(b, e),
            b.get("gen_tokens_per_s", "–"), r["ours_gen_greedy"]["new_tokens_per_s"], r.get("gen_speedup_greedy", "–"),
            r["ours_gen_beam"]["new_tokens_per_s"])))


if __name__ == "__main__":
    sys.exit(main())
