#!/usr/bin/env python
"""The original study's entry point, kept working:

    python run.py -task {translation,dialogue,summarization} -mode {train,test,inference}
                  -peft {none,lora,prefix_tuning,p_tuning,prompt_tuning,ia3} -search {greedy,beam}

`-search` also takes `sample` and `auto` (the task's decoding search on validation).

`-peft` is case-insensitive and `vanilla` means `none`. Any other `--flag` of the matching
`peft-nlg <mode>` subcommand is passed through (e.g. `--max-steps 50`).
"""

from __future__ import annotations

import argparse
import sys

from peft_nlg.methods import get_method
from peft_nlg.tasks import TASKS


def translate_args(argv: list[str]) -> list[str]:
    """Map the original single-dash flags onto `peft-nlg` subcommand arguments."""
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-task", required=True, choices=list(TASKS))
    parser.add_argument("-mode", required=True, choices=["train", "test", "inference"])
    parser.add_argument("-peft", default="lora", type=lambda name: get_method(name).name,
                        help="none (alias vanilla), lora, prefix_tuning, p_tuning, prompt_tuning, ia3")
    parser.add_argument("-search", default="greedy", choices=["greedy", "beam", "sample", "auto"])
    known, rest = parser.parse_known_args(argv)
    mapped = [known.mode, "--task", known.task, "--method", known.peft]
    if known.mode != "train":
        mapped += ["--search", known.search]
    return mapped + rest


def main(argv: list[str] | None = None) -> int:
    from peft_nlg.cli import main as cli_main
    return cli_main(translate_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
