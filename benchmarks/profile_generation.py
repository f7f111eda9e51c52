"""Where test mode's generation spends its time: the prefill against the decoding steps, and the ops of both.

Loads a model the way ``peft-nlg test`` does (the untrained base, or a trained run with ``--run-dir``), takes the
first ``--prompts`` test sources of a task and generates for them with test mode's decoding settings:

1. once with the task's new-token limit and once with one new token, unprofiled: the one-token run is the
   prefill (and one output head call), the difference the decoding steps;
2. once more under torch's profiler, whose op table (by op, and by op and input shapes) goes to ``--table``.

It prints a short summary and writes it as JSON (``--out``). Run it on an idle machine: other work changes the
times, and the profiler's own overhead inflates small ops, so compare op times with each other, not with the
unprofiled runs.

    python benchmarks/profile_generation.py --task dialogue --prompts 256 --out .dev/profile.json

This is a tool for finding what to speed up, not a benchmark: speed claims come from benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from peft_nlg.config import RunConfig
from peft_nlg.data.io import atomic_write_text, read_pairs, write_json
from peft_nlg.evaluation import decoding, load_for_generation
from peft_nlg.generation import generate
from peft_nlg.models import EMBEDDED_MODEL
from peft_nlg.runtime import hardware, package_versions
from peft_nlg.training import split_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="dialogue", help="ignored with --run-dir (the run's own task)")
    ap.add_argument("--model", default=EMBEDDED_MODEL, help="base model (without --run-dir)")
    ap.add_argument("--run-dir", help="a trained run (peft-nlg train's output directory) instead of the base model")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--prompts", type=int, default=256, help="the first N test sources")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the task's limit, as test mode")
    ap.add_argument("--search", default="greedy", choices=["greedy", "beam"])
    ap.add_argument("--rows", type=int, default=30, help="ops in each table")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--table", help="op tables (default: the JSON's name with .txt)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    table_path = Path(args.table) if args.table else out.with_suffix(".txt")
    for path in (out, table_path):
        if path.exists():
            print(f"{path}: exists; choose another --out/--table", file=sys.stderr)
            return 2
    options = {"task": args.task, "data_dir": args.data_dir, "search": args.search,
               "max_new_tokens": args.max_new_tokens}
    if args.run_dir:
        config = RunConfig(output_dir=args.run_dir, **options)
    else:
        config = RunConfig(method="none", model=args.model, **options)
    config, loaded, dev, dtype = load_for_generation(config, zero_shot=not args.run_dir)
    sources = [example["src"] for example in read_pairs(split_path(config, "test"))[: args.prompts]]
    settings = decoding(config, dev.type == "cuda")

    def run(limit: int) -> dict:  # its statistics, generate_seconds timed by generate itself (synchronized)
        return generate(loaded.model, loaded.tokenizer, loaded.prompter, sources,
                        dataclasses.replace(settings, max_new_tokens=limit), dev, dtype, show_progress=False)[1]

    run(1)  # kernels, allocator and packed weights' first use, outside the timings
    whole = run(settings.max_new_tokens)
    whole_s, prefill_s = whole["generate_seconds"], run(1)["generate_seconds"]
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if dev.type == "cuda" else [])],
                 record_shapes=True) as profiler:
        profiled_s = run(settings.max_new_tokens)["generate_seconds"]
    sort_by = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    by_op = profiler.key_averages()
    machine = hardware(dev)
    tables = [f"# {len(sources)} prompts, {settings.describe()}, {dtype}, {machine.get('gpu') or machine['cpu_model']}",
              "## by op", by_op.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=50),
              "## by op and input shapes",
              profiler.key_averages(group_by_input_shape=True).table(
                  sort_by=sort_by, row_limit=args.rows, max_name_column_width=40, max_shapes_column_width=90)]
    atomic_write_text(table_path, "\n\n".join(tables) + "\n")
    top = sorted(by_op, key=lambda event: event.self_cpu_time_total, reverse=True)[: args.rows]
    summary = {
        "date": time.strftime("%Y-%m-%d"), "hardware": machine, "versions": package_versions(),
        "model": args.run_dir or args.model, "task": config.task, "prompts": len(sources),
        "decoding": settings.describe(), "dtype": str(dtype).removeprefix("torch."),
        "generation": whole, "whole_s": round(whole_s, 3), "prefill_s": round(prefill_s, 3),
        "decoding_steps_s": round(whole_s - prefill_s, 3), "profiled_s": round(profiled_s, 3),
        "top_ops_self_cpu_ms": {event.key: round(event.self_cpu_time_total / 1e3, 1) for event in top},
        "table": str(table_path),
    }
    write_json(out, summary)
    print(f"{len(sources)} prompts, {whole['new_tokens']} new tokens in {whole_s:.1f} s "
          f"({whole['new_tokens_per_s']} new tokens/s): prefill {prefill_s:.1f} s, decoding steps "
          f"{whole_s - prefill_s:.1f} s; under the profiler {profiled_s:.1f} s")
    for name, ms in list(summary["top_ops_self_cpu_ms"].items())[:10]:
        print(f"  {name:<50} {ms / 1e3:8.2f} s")
    print(f"op tables: {table_path}; summary: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
