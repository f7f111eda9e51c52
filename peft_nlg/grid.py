"""The study grid: methods x tasks, a learning-rate search on validation, a data-size ladder, a zero-shot floor.

Every finished run leaves a small JSON record under ``--records``; a run whose record exists is skipped,
so an interrupted grid (or one spread over several short GPU slots) resumes where it stopped. Model
weights stay in ``--work-dir`` (not committed).

Fairness: each method gets the same number of learning rates to try (its default x ``--lr-factors``), the
same training budget in real tokens, and the same data; the test split is scored only for the learning
rate that was best on validation, and the ladder reuses that learning rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peft_nlg.config import build_config
from peft_nlg.data.io import write_json
from peft_nlg.evaluation import test
from peft_nlg.training import train

# fields that depend on the machine's speed or on where files are, not on the computation
VOLATILE = {"finished_at", "train_seconds", "train_tokens_per_s", "steady_tokens_per_s", "generate_seconds",
            "new_tokens_per_s", "generation_peak_memory_gb", "peak_memory_gb", "step_times", "_path",
            "test_file", "output_dir", "data_dir", "model", "hardware", "config"}


@dataclass
class GridSpec:
    tasks: list[str]
    methods: list[str]
    lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    ladder: list[int] = field(default_factory=list)  # training-set sizes besides the full split
    token_budget: int = 0                            # real training tokens per run (0: --epochs decides)
    overrides: dict = field(default_factory=dict)    # any RunConfig field, for every run
    zero_shot: bool = True

    def budget_overrides(self) -> dict:
        # with a budget in tokens the number of epochs stops mattering: the budget ends training
        return {"train_token_budget": self.token_budget, "epochs": 1000.0} if self.token_budget else {}


def _run_name(lr: float, examples: int) -> str:
    return f"lr{lr:g}-n{examples or 'all'}"


def _train_once(overrides: dict, work: Path) -> dict:
    record_path = work / "train_record.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    resume = (work / "checkpoint" / "state.json").is_file()
    config = build_config({**overrides, "output_dir": str(work), "resume": resume, "overwrite": not resume})
    return train(config)


def _test_once(overrides: dict, work: Path, record_dst: Path, extra: dict, zero_shot: bool = False) -> dict:
    if record_dst.is_file():
        return json.loads(record_dst.read_text())
    config = build_config({**overrides, "output_dir": str(work), "overwrite": True})
    record = test(config, zero_shot=zero_shot)
    record.update(extra)
    write_json(record_dst, record)
    return record


def run_grid(spec: GridSpec, records: Path, work_dir: Path, log=print) -> list[dict]:
    done = []
    for task in spec.tasks:
        base = {**spec.budget_overrides(), **spec.overrides, "task": task}
        if spec.zero_shot:
            dst = records / task / "zero_shot" / "record-test-greedy.json"
            done.append(_test_once({**base, "method": "none"}, work_dir / task / "zero_shot", dst,
                                   {"grid": {"selected": True}}, zero_shot=True))
            log(f"{task}/zero_shot: {done[-1]['scores']}")
        for method in spec.methods:
            default_lr = build_config({**base, "method": method}).learning_rate
            search = {}
            for factor in spec.lr_factors:
                lr = float(f"{default_lr * factor:.3g}")
                work = work_dir / task / method / _run_name(lr, 0)
                record = _train_once({**base, "method": method, "learning_rate": lr}, work)
                search[lr] = record["best_valid_loss"]
                log(f"{task}/{method} lr {lr:g}: valid loss {record['best_valid_loss']:.4f}")
            best_lr = min(search, key=search.get)
            search_path = records / task / method / "lr_search.json"
            summary = {"task": task, "method": method, "valid_loss_by_lr": {f"{k:g}": v for k, v in search.items()},
                       "selected_lr": best_lr}
            if not search_path.is_file() or json.loads(search_path.read_text()) != summary:
                write_json(search_path, summary)
            for examples in [0, *spec.ladder]:
                work = work_dir / task / method / _run_name(best_lr, examples)
                overrides = {**base, "method": method, "learning_rate": best_lr, "train_examples": examples}
                _train_once(overrides, work)
                dst = records / task / method / _run_name(best_lr, examples) / "record-test-greedy.json"
                done.append(_test_once(overrides, work, dst, {"grid": {
                    "selected": examples == 0, "learning_rate": best_lr, "train_examples": examples or None}}))
                log(f"{task}/{method} {_run_name(best_lr, examples)}: {done[-1]['scores']}")
    return done


def stable_view(record: dict) -> dict:
    """A record without the fields that depend on speed or paths: equal for equal computations."""
    if isinstance(record, dict):
        return {k: stable_view(v) for k, v in record.items() if k not in VOLATILE}
    if isinstance(record, list):
        return [stable_view(v) for v in record]
    return record
