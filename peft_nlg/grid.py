"""The study grid: methods x tasks, a learning-rate search on validation, a data-size ladder, a zero-shot floor.

Every finished run leaves a small JSON record under ``--records``; a run whose record exists is skipped,
so an interrupted grid (or one spread over several short GPU slots) resumes where it stopped. Model
weights stay in ``--work-dir`` (not committed).

Fairness: each method gets the same number of learning rates to try (its default x ``--lr-factors``), the
same training budget in real tokens, and the same data; the test split is scored only for the learning
rate that was best on validation, and the ladder reuses that learning rate. Decoding is chosen the same way
(``--search auto``, the default: the task's decoding search on validation, greedy where a task declares none)
for the table's runs, zero-shot included; the ladder reuses each method's choice.

Speed: a small model leaves a GPU mostly waiting on the host, so up to ``parallel`` runs of one group (the
learning rates of one method's search, a few ladder rungs) train at once in worker processes that share the
device, and while a search trains, this process tests the model finished before it. Records say how many
processes shared the device, so training times and generation speeds are read in context.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from peft_nlg.config import DECODING_SETTINGS, TEST_SETTINGS, build_config, check_keys, load_config_file, yaml_defaults
from peft_nlg.data.io import write_json
from peft_nlg.data.splits import fingerprint
from peft_nlg.evaluation import AUTO, scored_examples, test
from peft_nlg.runtime import release_device_memory
from peft_nlg.training import data_fingerprints, train

# fields that depend on the machine's speed or on where files are, not on the computation
VOLATILE = {"finished_at", "train_seconds", "train_tokens_per_s", "steady_tokens_per_s", "generate_seconds",
            "new_tokens_per_s", "generation_peak_memory_gb", "peak_memory_gb", "step_times", "_path",
            "test_file", "output_dir", "data_dir", "model", "hardware", "config", "command",
            "concurrent_runs"}


@dataclass
class GridSpec:
    tasks: list[str]
    methods: list[str]
    lr_factors: list[float] | dict[str, list[float]] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # or per task
    lr_extensions: int = 0                           # rates tried beyond the search's edge while an edge rate wins
    ladder: list[int] = field(default_factory=list)  # training-set sizes besides the full split
    token_budget: int | dict[str, int] = 0           # real training tokens per run, or per task (0: epochs decide)
    overrides: dict = field(default_factory=dict)    # any RunConfig field, for every run
    method_options: dict[str, dict] = field(default_factory=dict)  # peft options per method, for its runs
    zero_shot: bool = True
    time_limit_s: float = 0.0                        # stop before a run that would not end in time (0: no limit)
    parallel: int = 1                                # training runs at once, in processes sharing the device

    def base_overrides(self, task: str) -> dict:
        budget = self.token_budget.get(task, 0) if isinstance(self.token_budget, dict) else self.token_budget
        # with a budget in tokens the number of epochs stops mattering: the budget ends training
        budget_fields = {"train_token_budget": budget, "epochs": 1000.0} if budget else {}
        return {"search": AUTO, **budget_fields, **self.overrides, "task": task}

    def method_overrides(self, task: str, method: str, **extra) -> dict:
        """A trained run's settings: the task's, the method and its options, then ``extra``."""
        options = {"method_options": self.method_options[method]} if method in self.method_options else {}
        return {**self.base_overrides(task), "method": method, **options, **extra}

    def learning_rates(self, task: str, method: str) -> list[float]:
        default_lr = build_config(self.method_overrides(task, method)).learning_rate
        factors = self.lr_factors
        if isinstance(factors, dict):
            if task not in factors:
                raise ValueError(f"lr_factors has no entry for task '{task}' (it has {', '.join(sorted(factors))})")
            factors = factors[task]
        return [float(f"{default_lr * factor:.3g}") for factor in factors]


class OutOfTime(Exception):
    pass


class _Clock:
    """Refuses to start a unit of work that the time limit would cut off (its work dir may not survive)."""

    def __init__(self, limit_s: float):
        self.limit_s, self.started, self.longest = limit_s, time.monotonic(), {}

    def check(self, task: str) -> None:
        elapsed = time.monotonic() - self.started
        expected = self.longest.get(task, max(self.longest.values(), default=0.0))
        # the first unit always runs, so every invocation makes progress
        if self.limit_s and self.longest and elapsed + 1.2 * expected > self.limit_s:
            raise OutOfTime(f"{elapsed:.0f} s spent, the next {task} run takes about {expected:.0f} s")

    def took(self, task: str, seconds: float) -> None:
        self.longest[task] = max(self.longest.get(task, 0.0), seconds)

    def run(self, task: str, work, *args, **kwargs):
        self.check(task)
        begun = time.monotonic()
        result = work(*args, **kwargs)
        self.took(task, time.monotonic() - begun)
        return result


def study_defaults() -> dict:
    """defaults/study.yaml: the committed grid settings, checked like every other layer of defaults."""
    study = yaml_defaults("study.yaml")
    unknown = set(study) - {"token_budget", "lr_factors", "lr_extensions", "ladder", "parallel", "set"}
    if unknown:
        raise ValueError(f"defaults/study.yaml: unknown key(s) {', '.join(sorted(unknown))}")
    factors = study.get("lr_factors")
    for task, rates in (factors.items() if isinstance(factors, dict) else [("every task", factors)]):
        valid = isinstance(rates, list) and len(rates) >= 2
        if not (valid and all(isinstance(f, int | float) and f > 0 for f in rates)):
            raise ValueError(f"defaults/study.yaml: lr_factors ({task}) must be a list of two or more factors > 0")
    extensions = study.setdefault("lr_extensions", 0)
    if not isinstance(extensions, int) or isinstance(extensions, bool) or extensions < 0:
        raise ValueError(f"defaults/study.yaml: lr_extensions must be a whole number >= 0, not {extensions!r}")
    parallel = study.setdefault("parallel", {})
    if set(parallel) - {"cpu", "cuda"} or not all(isinstance(n, int) and n >= 1 for n in parallel.values()):
        raise ValueError("defaults/study.yaml: parallel must map cpu and/or cuda to a number of runs >= 1")
    study["parallel"] = {"cpu": 1, "cuda": 1, **parallel}
    check_keys(study.get("set", {}), "defaults/study.yaml:set")
    return study


def _run_name(lr: float, examples: int) -> str:
    return f"lr{lr:g}-n{examples or 'all'}"


# where the grid keeps what it has done; run_grid writes these and plan reads them
def _run_records(records: Path, task: str, method: str, run: str = "") -> Path:
    return records / task / method / run


def _test_record(run_records: Path) -> Path | None:
    """The run's test record, named after the decoding it used (``record-test-<search>.json``), if any."""
    return next(iter(sorted(run_records.glob("record-test-*.json"))), None)


def _train_record(records: Path, task: str, method: str, run: str) -> Path:
    return _run_records(records, task, method, run) / "record-train.json"


def _search_record(records: Path, task: str, method: str) -> Path:
    return records / task / method / "lr_search.json"


# settings that change nothing a training run computes (compiled blocks and batches split for memory compute the
# same, up to rounding)
_NOT_TRAINING = DECODING_SETTINGS | TEST_SETTINGS | {
    "output_dir", "resume", "overwrite", "threads", "report_to", "save_checkpoints", "compile", "profile_steps",
    "cudnn_attention", "max_forward_tokens"}


def _training_differences(have: dict, overrides: dict, work: Path) -> list[str]:
    """The training settings where a run's saved configuration differs from what the grid asks now (settings
    one of them does not know are skipped: another version of the tool)."""
    wanted = build_config({**overrides, "output_dir": str(work)}).to_dict()
    return [f"{k}={have[k]!r} (now {wanted[k]!r})" for k in wanted
            if k not in _NOT_TRAINING and k in have and wanted[k] != have[k]]


def _data_differences(record: dict, overrides: dict, work: Path) -> list[str]:
    """The splits whose examples, as a train or test record fingerprinted them, differ from what the run would
    read now (a split rebuilt from newer sources, or with other sizes)."""
    config = build_config({**overrides, "output_dir": str(work)})
    have = dict(record.get("data_fingerprints") or (record.get("train") or {}).get("data_fingerprints") or {})
    now = data_fingerprints(config) if have else {}
    if "test_fingerprint" in record:
        have["test"], now = record["test_fingerprint"], {**now, "test": fingerprint(scored_examples(config)[1])}
    return [f"{split} examples {have[split]} (now {now[split]})" for split in now if have.get(split) != now[split]]


def _check_record(record_path: Path, overrides: dict, work: Path, settings: bool = True) -> None:
    """A record the grid would reuse must be the run it asks for: one made with other settings (the defaults
    changed since, say) or on other data is refused by name instead of being mixed silently into this grid's
    results. ``settings=False``: the data only (a test record, whose run's training record is checked beside it)."""
    record = json.loads(record_path.read_text())
    have = record.get("config") if settings else None  # early records lack a config
    differences = (_training_differences(have, overrides, work) if have else []) + _data_differences(
        record, overrides, work)
    if differences:
        raise ValueError(f"{record_path}: made with {', '.join(differences)}; move it away to run it again, or "
                         "run the grid with the settings and data it was made with")


def check_reused_records(spec: GridSpec, records: Path, work_dir: Path) -> None:
    """Checks every record the grid would reuse instead of running again (``_check_record``), before anything
    runs: a mismatch found late would cost a GPU slot its remaining time."""
    for task in spec.tasks:
        zero_shot = _test_record(_run_records(records, task, "zero_shot"))
        if spec.zero_shot and zero_shot:
            _check_record(zero_shot, {**spec.base_overrides(task), "method": "none"}, work_dir / task / "zero_shot",
                          settings=False)
        for method in spec.methods:
            search = _read(_search_record(records, task, method))
            runs = [(lr, 0) for lr in _known_rates(spec, task, method, records)]
            runs += [(search["selected_lr"], examples) for examples in spec.ladder] if search else []
            for lr, examples in runs:
                run = _run_name(lr, examples)
                overrides = spec.method_overrides(task, method, learning_rate=lr,
                                                  **({"train_examples": examples} if examples else {}))
                train_record, test_record = _train_record(records, task, method, run), _test_record(
                    _run_records(records, task, method, run))
                for path, settings in ((train_record, not examples), (test_record, False)):
                    if path and path.is_file():
                        _check_record(path, overrides, work_dir / task / method / run, settings)


def _same_settings(work: Path, overrides: dict) -> bool:
    """Whether the run already in ``work`` (from an earlier grid, perhaps with other settings) is this one."""
    saved = work / "config.yaml"
    if not saved.is_file():
        return False
    try:
        have = load_config_file(saved).to_dict()
    except (ValueError, TypeError):  # written by another version of the tool: not this run
        return False
    local = work / "train_record.json"
    return not _training_differences(have, overrides, work) and not (
        local.is_file() and _data_differences(json.loads(local.read_text()), overrides, work))


def _train_once(overrides: dict, work: Path, record_dst: Path, need_model: bool, shared_by: int = 1) -> dict:
    """Train unless done; the record is kept under the records (so a learning-rate search survives a lost
    work dir), the model only in the work dir: a run whose model is needed but gone is trained again. A work
    dir is reused (or resumed) only if it holds this very run; one trained with other settings is replaced."""
    local = work / "train_record.json"
    same = _same_settings(work, overrides)
    if same and local.is_file() and (work / "model").is_dir():
        record = json.loads(local.read_text())
    elif record_dst.is_file() and not need_model:
        return json.loads(record_dst.read_text())
    else:
        resume = same and (work / "checkpoint" / "state.json").is_file()
        record = train(build_config({**overrides, "output_dir": str(work), "resume": resume, "overwrite": not resume}))
        if shared_by > 1:  # its times were measured while other runs used the same device
            record["concurrent_runs"] = shared_by
            write_json(local, record)
    if not record_dst.is_file():
        write_json(record_dst, {k: v for k, v in record.items() if k != "step_times"})
    return record


def _in_worker(function, overrides: dict, work: Path, *args):
    """One job in a worker process; its output goes to <work>/train.log, not into the grid's log."""
    work.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    with open(work / "train.log", "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        return function(overrides, work, *args)
    except BaseException:
        traceback.print_exc()  # the whole story stays in the run's log; the grid gets the one-line reason
        raise


class _Workers:
    """Runs jobs ``function(overrides, work_dir, ..., shared_by)`` one after another, or up to ``parallel`` at
    once in worker processes (``shared_by`` tells each how many ran beside it)."""

    def __init__(self, parallel: int):
        self.parallel, self._pool = max(1, parallel), None
        # the host's cores are split between the workers, so they do not oversubscribe them
        self.threads = max(1, (os.cpu_count() or 1) // self.parallel)

    def map(self, function, jobs: list[tuple]) -> list:
        return self.submit(function, jobs)()

    def in_parallel(self, jobs: list[tuple]) -> bool:
        return self.parallel > 1 and len(jobs) > 1

    def submit(self, function, jobs: list[tuple]):
        """Starts the first ``parallel`` jobs in the workers and returns a call that waits for them (and runs
        the rest); meanwhile this process is free. Run one by one, the jobs wait for that call."""
        if not self.in_parallel(jobs):
            return lambda: [function(*job) for job in jobs]
        first, rest = jobs[:self.parallel], jobs[self.parallel:]
        collect = self._start(function, first)
        return lambda: collect() + self.map(function, rest)

    def _start(self, function, group: list[tuple]):
        if self._pool is None:  # spawned, not forked: CUDA cannot be shared with a forked child
            self._pool = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"))
        futures = [self._pool.submit(_in_worker, function, {"threads": self.threads, **overrides}, work, *rest,
                                     len(group)) for overrides, work, *rest in group]

        def collect() -> list:
            results, failures = [], []
            for job, future in zip(group, futures, strict=True):
                try:  # the group's other runs finish and keep their records whatever happens to this one
                    results.append(future.result())
                except Exception as shared_error:
                    if isinstance(shared_error, BrokenProcessPool):  # a worker was killed (host memory, say):
                        self.close(wait=False)                       # the next group gets fresh workers
                    # sharing the device may be the cause (memory): once more, alone, in this process
                    work = job[1]
                    print(f"{work}: failed beside other runs ({type(shared_error).__name__}: {shared_error}); "
                          "running it alone", file=sys.stderr)
                    try:
                        results.append(function(*job))
                    except Exception as error:
                        failures.append(f"{work}: {type(error).__name__}: {error} (log: {work / 'train.log'})")
            if failures:
                raise RuntimeError("training failed: " + "; ".join(failures))
            return results
        return collect

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
            self._pool = None


def _test_once(overrides: dict, work: Path, run_records: Path, extra: dict, zero_shot: bool = False,
               shared_by: int = 1) -> dict:
    config = build_config({**overrides, "output_dir": str(work), "overwrite": True})
    record = test(config, zero_shot=zero_shot)
    record.update(extra)
    if shared_by > 1:  # its generation speed was measured while training runs used the device
        record["grid"] = {**record.get("grid", {}), "concurrent_runs": shared_by}
    write_json(run_records / f"record-test-{record['decoding']['search']}.json", record)
    return record


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _train_and_test(overrides: dict, work: Path, run_records: Path, grid_fields: dict, shared_by: int = 1) -> dict:
    _train_once(overrides, work, run_records / "record-train.json", True, shared_by)
    return _test_once(overrides, work, run_records, {"grid": grid_fields}, shared_by=shared_by)


def run_grid(spec: GridSpec, records: Path, work_dir: Path, log=print) -> list[dict]:
    """Phase 1 fills the results table (zero-shot, search, selected run on the full split) task by task;
    phase 2 runs the data-size ladder. Returns the test records, reused ones included."""
    check_reused_records(spec, records, work_dir)
    clock, done, workers = _Clock(spec.time_limit_s), [], _Workers(spec.parallel)

    def tested(task: str, run_records: Path, work, *args, **kwargs):
        existing = _test_record(run_records)
        record = _read(existing) if existing else clock.run(task, work, *args, **kwargs)
        release_device_memory()  # workers training next need the memory this process's test held
        done.append(record)
        searched = record.get("decoding_search") or {}
        if searched.get("candidates"):
            log(f"{task}/{record['method']} decoding on validation: " + "; ".join(
                f"{c['name']}: " + ", ".join(f"{k} {c['scores'][k]}" for k in searched["shown"])
                for c in searched["candidates"]) + f" -> {searched['chosen_name']}")
        log(f"{task}/{record['method']} {run_records.name}: {record['scores']}")

    try:
        for task in spec.tasks:
            base = spec.base_overrides(task)
            # a test whose model is ready runs in this process while the workers train the next search
            ready = []
            if spec.zero_shot:
                dst = _run_records(records, task, "zero_shot")
                ready.append(partial(tested, task, dst, _test_once, {**base, "method": "none"},
                                     work_dir / task / "zero_shot", dst, {"grid": {"selected": True}}, zero_shot=True))
            for method in spec.methods:
                best_lr = _search(spec, task, method, records, work_dir, clock, workers, log, meanwhile=ready)
                run = _run_name(best_lr, 0)
                dst = _run_records(records, task, method, run)
                overrides = spec.method_overrides(task, method, learning_rate=best_lr)
                ready = [partial(tested, task, dst, _train_and_test, overrides, work_dir / task / method / run, dst,
                                 {"selected": True, "learning_rate": best_lr, "train_examples": None})]
            for test_now in ready:
                test_now()
        for task in spec.tasks:
            rungs = []
            for method in spec.methods if spec.ladder else []:
                best_lr = json.loads(_search_record(records, task, method).read_text())["selected_lr"]
                selected = _read(_test_record(_run_records(records, task, method, _run_name(best_lr, 0))))
                # the decoding the selected run's search chose (none: the grid's own settings stand)
                chosen_decoding = (selected.get("decoding_search") or {}).get("chosen", {})
                for examples in spec.ladder:
                    run = _run_name(best_lr, examples)
                    overrides = spec.method_overrides(task, method, learning_rate=best_lr, train_examples=examples,
                                                      **chosen_decoding)
                    rungs.append((overrides, work_dir / task / method / run, _run_records(records, task, method, run),
                                  {"selected": False, "learning_rate": best_lr, "train_examples": examples}))
            for start in range(0, len(rungs), workers.parallel):
                group = [rung for rung in rungs[start:start + workers.parallel] if _test_record(rung[2]) is None]
                if len(group) > 1:  # trained and tested together (a rung's test takes about as long as its training)
                    clock.run(task, workers.map, _train_and_test, group)
                for rung in rungs[start:start + workers.parallel]:
                    tested(task, rung[2], _train_and_test, *rung)
    except OutOfTime as stop:
        log(f"time limit: {stop}; {len(done)} test records so far. Run the same command again to go on.")
    finally:
        workers.close()
    return done


def beyond_edge(losses: dict[float, float]) -> float | None:
    """The next rate outward when the search's largest or smallest rate won (the same step as its two outermost
    rates), or None when the best rate has a worse one on each side: a winner at the edge says the best rate may
    lie outside the range searched."""
    if len(losses) < 2:
        return None
    rates, best = sorted(losses), min(losses, key=losses.get)
    if best == rates[-1]:
        return float(f"{rates[-1] * rates[-1] / rates[-2]:.3g}")
    if best == rates[0]:
        return float(f"{rates[0] * rates[0] / rates[1]:.3g}")
    return None


def _search_walk(spec: GridSpec, task: str, method: str, losses_of) -> tuple[list[float], dict[float, float] | None]:
    """The rates a search trains: the spec's, then, while the best is the largest or smallest tried, up to
    ``spec.lr_extensions`` rates beyond it, one step further each. ``losses_of(rates)`` gives those rates'
    validation losses (training them, or reading their records: None where unknown, which ends the walk)."""
    rates = spec.learning_rates(task, method)
    losses = losses_of(rates)
    for _ in range(spec.lr_extensions):
        beyond = beyond_edge(losses) if losses is not None else None
        if beyond is None:
            break
        rates = [*rates, beyond]
        more = losses_of([beyond])
        losses = None if more is None else {**losses, **more}
    return rates, losses


def _search(spec: GridSpec, task: str, method: str, records: Path, work_dir: Path, clock: _Clock,
            workers: _Workers, log, meanwhile=()) -> float:
    """Train each learning rate of the search on the full split (``_search_walk``); the lowest validation loss
    wins (the test split is not used). ``meanwhile``: work for this process while the workers train the first
    rates, told how many processes share the device (run before the search when runs go one by one)."""
    pending = [meanwhile]

    def train(rates: list[float]) -> dict[float, float]:
        if not pending:  # a rate past the edge
            log(f"{task}/{method}: the best rate so far is the edge of those tried; trying {rates[0]:g}")
        return _train_rates(spec, task, method, rates, records, work_dir, clock, workers, log,
                            pending.pop() if pending else ())

    rates, losses = _search_walk(spec, task, method, train)
    best_lr = min(losses, key=losses.get)
    summary = {"task": task, "method": method,
               "valid_loss_by_lr": {f"{k:g}": v for k, v in sorted(losses.items())}, "selected_lr": best_lr}
    extended = rates[len(spec.learning_rates(task, method)):]
    if extended:
        summary["extended"] = extended
    path = _search_record(records, task, method)
    if _read(path) != summary:
        write_json(path, summary)
    return best_lr


def _train_rates(spec: GridSpec, task: str, method: str, rates: list[float], records: Path, work_dir: Path,
                 clock: _Clock, workers: _Workers, log, meanwhile=()) -> dict[float, float]:
    """Trains the rates without a record (at once where the workers allow) and returns each rate's best
    validation loss."""
    jobs = {}
    for lr in rates:
        run = _run_name(lr, 0)
        overrides = spec.method_overrides(task, method, learning_rate=lr)
        jobs[lr] = (overrides, work_dir / task / method / run, _train_record(records, task, method, run))
    untrained = [(*job, False) for job in jobs.values() if not job[2].is_file()]  # no model needed yet
    if not (untrained and workers.in_parallel(untrained)):  # nothing to wait for: this process's work first
        for work in meanwhile:
            work()
        meanwhile = ()
    if untrained:
        clock.check(task)
        started = time.monotonic()
        collect = workers.submit(_train_once, untrained)
        for work in meanwhile:
            work(shared_by=min(workers.parallel, len(untrained)) + 1)
        trained = collect()
        seconds = time.monotonic() - started
        clock.took(task, seconds)
        # what sharing the device buys shows here: the search's real tokens over its wall time, loading included
        tokens = sum(r["train_tokens"] for r in trained)
        beside = " beside a test in the main process" if meanwhile else ""
        log(f"{task}/{method}: {len(trained)} runs, up to {workers.parallel} at once{beside}: {tokens:,} tokens in "
            f"{seconds:.0f} s, {tokens / seconds:,.0f} tokens/s together")
    losses = {}
    for lr, (_, _, dst) in jobs.items():
        losses[lr] = json.loads(dst.read_text())["best_valid_loss"]
        log(f"{task}/{method} lr {lr:g}: valid loss {losses[lr]:.4f}")
    return losses


def _known_rates(spec: GridSpec, task: str, method: str, records: Path) -> list[float]:
    """The rates a search trains, as far as its records tell (the rates past the edge follow from the losses of
    those trained before them)."""
    def recorded(rates: list[float]) -> dict[float, float] | None:
        runs = [_read(_train_record(records, task, method, _run_name(lr, 0))) for lr in rates]
        return {lr: run["best_valid_loss"] for lr, run in zip(rates, runs, strict=True)} if all(runs) else None

    return sorted(_search_walk(spec, task, method, recorded)[0])


def plan(spec: GridSpec, records: Path) -> list[tuple[str, bool]]:
    """Every run of the grid and whether its record exists, in the order the grid runs them."""
    rows, settled = [], {}  # settled: a search's selection, once every rate it trains has a record
    for task in spec.tasks:
        if spec.zero_shot:
            rows.append((f"{task}/zero_shot test", _test_record(_run_records(records, task, "zero_shot")) is not None))
        for method in spec.methods:
            search = _read(_search_record(records, task, method))
            lrs = _known_rates(spec, task, method, records)
            trained = [_train_record(records, task, method, _run_name(lr, 0)).is_file() for lr in lrs]
            rows += [(f"{task}/{method} {_run_name(lr, 0)} train", done) for lr, done in zip(lrs, trained, strict=True)]
            if not all(trained):  # a rate still to train (past the edge, say) may change the selection
                search = None
            settled[(task, method)] = search
            selected = _run_name(search["selected_lr"], 0) if search else "selected lr"
            rows.append((f"{task}/{method} {selected} test", bool(search) and _test_record(
                _run_records(records, task, method, selected)) is not None))
    for task in spec.tasks:
        for method in spec.methods:
            search = settled[(task, method)]
            for examples in spec.ladder:
                name = _run_name(search["selected_lr"], examples) if search else f"n{examples}"
                rows.append((f"{task}/{method} {name} train+test", bool(search) and _test_record(
                    _run_records(records, task, method, name)) is not None))
    return rows


def stable_view(record: dict) -> dict:
    """A record without the fields that depend on speed or paths: equal for equal computations."""
    if isinstance(record, dict):
        return {k: stable_view(v) for k, v in record.items() if k not in VOLATILE}
    if isinstance(record, list):
        return [stable_view(v) for v in record]
    return record
