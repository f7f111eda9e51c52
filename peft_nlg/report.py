"""Results tables and plots, generated only from run records (never edited by hand).

``peft-nlg report`` reads every ``record-test-*.json`` under the records folder and writes
``<records>/RESULTS.md`` (detailed table), PNG plots, and the README's results table (with the plots) between its
markers; ``--check`` only compares and fails when the README's block, ``RESULTS.md`` or a plot differs from what
the records give (each PNG carries a fingerprint of what it was drawn from).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from peft_nlg.data.io import atomic_write_text
from peft_nlg.evaluation import ZERO_SHOT
from peft_nlg.generation import DecodingSettings
from peft_nlg.grid import beyond_edge
from peft_nlg.methods import METHODS
from peft_nlg.runtime import attention_kernel_names
from peft_nlg.targets import Outcome, check_targets, load_targets
from peft_nlg.tasks import TASKS

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
ROW_ORDER = [ZERO_SHOT, *METHODS]
ROW_TITLES = {ZERO_SHOT: "Zero-shot (no training)", **{m.name: m.title for m in METHODS.values()}}


# records of settings the study no longer uses (a method's defaults changed): kept beside the others as
# evidence, read by neither the report nor the grid
ARCHIVE = "archive"


def _record_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.relative_to(root).parts[0] != ARCHIVE)


def load_records(root: Path) -> list[dict]:
    """Every test record under ``root``; a grid run whose learning rate its search no longer selects (the search
    went on past an edge in a later slot and found a better rate) is marked ``_superseded``: kept as evidence,
    never in the table or the learning curves."""
    selected = {(s["task"], s["method"]): s["selected_lr"] for s in load_searches(root)}
    records = []
    for path in _record_files(root, "record-test-*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["_path"] = str(path)
        rate, best = (record.get("grid") or {}).get("learning_rate"), selected.get((record["task"], record["method"]))
        record["_superseded"] = None not in (rate, best) and rate != best
        records.append(record)
    return records


def load_searches(root: Path) -> list[dict]:
    """The grid's learning-rate searches (``<task>/<method>/lr_search.json``)."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in _record_files(root, "lr_search.json")]


def mixed_data(records: list[dict]) -> list[str]:
    """One line per record whose test, validation or training examples (its fingerprints) differ from those of
    most records of its task that should share them: scores on other data do not compare, so the report
    refuses to put them in one table."""
    groups: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        trained = (r.get("train") or {}).get("data_fingerprints") or {}
        rung = ((r.get("config") or {}).get("train_examples") or 0, r.get("seed"))  # the ladder's subsets
        for what, key, value in (("test", (), r.get("test_fingerprint")), ("validation", (), trained.get("valid")),
                                 ("training", rung, trained.get("train"))):
            if value:  # early records and zero-shot lack some
                groups[(r["task"], what, *key)][value].append(r["_path"])
    problems = []
    for (task, what, *_), by_value in groups.items():
        common = max(by_value, key=lambda v: len(by_value[v]))
        problems += [f"{path}: its {what} examples ({value}) differ from those of the {len(by_value[common])} "
                     f"other {task} record(s) like it ({common}); move one set to {ARCHIVE}/ or run it again"
                     for value, paths in by_value.items() if value != common for path in paths]
    return problems


def _is_headline(record: dict) -> bool:
    """The table shows full-data runs chosen on validation; ladder runs (subsets) feed the learning curves."""
    return (record.get("grid", {}).get("selected", True) and not record.get("config", {}).get("train_examples")
            and not record.get("_superseded"))


def _decoding_chosen(record: dict) -> bool:
    """Greedy, or whatever a decoding search on validation chose (the grid): a beam or sampling run someone
    tried by hand beside it does not replace the table's number."""
    return bool(record.get("decoding_search")) or "grid" in record or record["decoding"]["search"] == "greedy"


def _decoding_name(record: dict) -> str:
    known = {f: v for f, v in record["decoding"].items() if f in DecodingSettings.__dataclass_fields__}
    return DecodingSettings(**known).describe()


def _cell(record: dict | None, task: str) -> str:
    if record is None:
        return "–"
    spec, scores = TASKS[task], record["scores"]
    text = f"{scores[spec.main_metric]:.2f} ({spec.second_metric} {scores[spec.second_metric]:.2f})"
    if record["method"] != ZERO_SHOT and record.get("total_params"):
        text += f" · {100 * record['trainable_params'] / record['total_params']:.2f}%"
    if record["decoding"]["search"] != "greedy":
        text += f" · {_decoding_name(record)}"
    return text


def _best(records: list[dict]) -> dict[tuple[str, str], dict]:
    chosen: dict[tuple[str, str], dict] = {}
    for r in records:
        if _is_headline(r) and _decoding_chosen(r):
            key = (r["method"], r["task"])
            chosen[key] = r  # sorted paths: a later run of the same cell replaces an earlier one
    return chosen


def main_table(records: list[dict], details: str = "results/RESULTS.md") -> str:
    """The README's table and plots; ``details`` is where the detailed results are, as the README links them
    (the plots are beside it)."""
    if not records:
        return "No run records yet: the table is generated by `peft-nlg report` from committed records."
    chosen = _best(records)
    headers = ["Method", *(f"{t.title()} ({TASKS[t].main_metric})" for t in TASKS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method in ROW_ORDER:  # every row of the original's table, "–" where no record exists yet
        lines.append("| " + " | ".join([ROW_TITLES[method], *(_cell(chosen.get((method, t)), t) for t in TASKS)])
                     + " |")
    lines.append("")
    lines.append(f"Cells: main metric (second metric) · trainable share of parameters · decoding where not greedy "
                 f"(chosen on the validation split, never the test split); {_provenance(chosen.values())}. "
                 f"Details: `{details}`.")
    outcomes = check_targets(chosen, load_targets())
    if outcomes:
        counts = {v: sum(o.verdict == v for o in outcomes) for v in ("met", "missed", "no record")}
        lines.append("")
        lines.append(f"Quality targets (`peft_nlg/defaults/targets.yaml`): {counts['met']} met, "
                     f"{counts['missed']} missed, {counts['no record']} without a record yet; "
                     f"each one with its numbers in `{details}`.")
    folder = details.rsplit("/", 1)[0] + "/" if "/" in details else ""
    for name in plot_contents(records):
        lines += ["", f"![{PLOT_CAPTIONS[name]}]({folder}{name})"]
    return "\n".join(lines)


def _provenance(records) -> str:
    """Where and when the table's runs ran: every distinct card, date and version set, none assumed."""
    records = list(records)
    cards = sorted({r.get("hardware", {}).get("gpu") or r.get("hardware", {}).get("cpu") or "?" for r in records})
    dates = sorted({r.get("finished_at", "")[:10] for r in records} - {""})
    versions = sorted({" ".join(f"{k} {r['versions'].get(k)}" for k in ("torch", "transformers", "peft"))
                       for r in records})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "undated"
    return f"{', '.join(cards)}, {when}; {'; '.join(versions)}"


def _sharing(records) -> str:
    """How many runs trained at once on one device (the grid's ``parallel``), for reading training times."""
    counts = sorted({(r.get("train") or {}).get("concurrent_runs") or 1 for r in records if r.get("train")})
    if counts in ([], [1]):
        return ""
    return f"up to {counts[-1]} runs trained at once on one device" if len(counts) > 1 else (
        f"{counts[0]} runs trained at once on one device")


def _at_once(value, shared: int | None) -> str:
    return f"{value}" + (f" ({shared} at once)" if (shared or 1) > 1 else "")


def _with_cudnn_attention(stage: dict | None, record: dict) -> bool:
    """Whether a GPU time was measured while attention could use cuDNN's kernels: torch's default, and so
    the case of records that do not say, until 2026-11-27 (slower here, see ``runtime.attention_kernels``)."""
    on_gpu = bool(record.get("hardware", {}).get("gpu"))
    return on_gpu and bool(stage) and stage.get("attention_kernels") != attention_kernel_names(allow_cudnn=False)


def _timed(value, stage: dict | None, record: dict, shared: int | None) -> str:
    return (_at_once(value, shared) + (" (cuDNN attn.)" if _with_cudnn_attention(stage, record) else "")
            + (" (compiled)" if (stage or {}).get("compiled") else ""))


def detailed_table(records: list[dict]) -> str:
    headers = ["task", "method", "train ex.", "search", "scores", "trainable", "train s", "tokens/s", "peak GB",
               "adapter MB", "gen tok/s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in sorted(records, key=lambda r: (r["task"], ROW_ORDER.index(r["method"]) if r["method"] in ROW_ORDER else 99,
                                            r.get("config", {}).get("train_examples") or 10**9)):
        train = r.get("train") or {}
        scores = ", ".join(f"{k} {v}" for k, v in r["scores"].items() if not k.endswith("signature"))
        lines.append("| " + " | ".join(str(x) for x in [
            r["task"], r["method"] + (" (superseded)" if r.get("_superseded") else ""),
            r.get("config", {}).get("train_examples") or "all", _decoding_name(r),
            scores, f"{r['trainable_params']:,}",
            _timed(train.get("train_seconds", "–"), train, r, train.get("concurrent_runs")),
            train.get("train_tokens_per_s", "–"), train.get("peak_memory_gb", "–"),
            round(r.get("adapter_size_bytes", 0) / 2**20, 2),
            _timed(r["generation"]["new_tokens_per_s"], r["generation"], r, r.get("grid", {}).get("concurrent_runs"))
        ]) + " |")
    return "\n".join(lines)


def search_table(searches: list[dict]) -> str:
    """Every learning rate tried, its best validation loss, and the one the test used (bold); a selected rate
    still at the edge of those tried (the search stopped at its limit of steps outward) is marked, since the
    best rate may lie beyond it."""
    lines = ["| task | method | validation loss by learning rate | selected |", "|---|---|---|---|"]
    for s in sorted(searches, key=lambda s: (s["task"], ROW_ORDER.index(s["method"]))):
        selected = f"{s['selected_lr']:g}"
        losses = {float(lr): loss for lr, loss in s["valid_loss_by_lr"].items()}
        edge = " (edge: the best may lie beyond)" if beyond_edge(losses) is not None else ""
        tried = " · ".join(f"**{lr}: {loss:.4f}**" if lr == selected else f"{lr}: {loss:.4f}"
                           for lr, loss in sorted(s["valid_loss_by_lr"].items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {s['task']} | {s['method']} | {tried} | {selected}{edge} |")
    return "\n".join(lines)


def decoding_table(records: list[dict]) -> str:
    """Every decoding a search tried on validation, its scores, and the one the test used (bold)."""
    lines = ["| task | method | validation scores by decoding | chosen |", "|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["task"], ROW_ORDER.index(r["method"]))):
        searched = r.get("decoding_search") or {}
        if not searched.get("candidates"):
            continue
        shown = searched.get("shown") or [r["main_metric"]]
        tried = " · ".join(
            (f"**{c['name']}: {scores}**" if c["name"] == searched["chosen_name"] else f"{c['name']}: {scores}")
            for c in searched["candidates"]
            for scores in [", ".join(f"{k} {c['scores'][k]}" for k in shown if k in c["scores"])])
        lines.append(f"| {r['task']} | {r['method']} | {tried} | {searched['chosen_name']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def targets_table(outcomes: list[Outcome]) -> str:
    lines = ["| target | task | method | records give | verdict |", "|---|---|---|---|---|"]
    for o in outcomes:
        verdict = {"met": "met", "missed": "**missed**"}.get(o.verdict, o.verdict)
        lines.append(f"| {o.target} | {o.task} | {o.method} | {o.value or '–'} | {verdict} |")
    return "\n".join(lines)


def results_markdown(records: list[dict], searches: list[dict]) -> str:
    chosen = _best(records)
    parts = ["# Detailed results", "",
             f"Generated by `peft-nlg report` from the run records in this folder ({_provenance(records)}).", "",
             "## Every test run", ""]
    sharing = _sharing(records)
    if sharing:
        parts += [f"Times and tokens/s: {sharing} where marked (the grid's `parallel`); compare "
                  "them between runs that shared alike. The speed benchmark (`docs/benchmarks.md`) times runs "
                  "alone.", ""]
    if any(_with_cudnn_attention(r.get("train"), r) or _with_cudnn_attention(r["generation"], r) for r in records):
        parts += ["Times marked (cuDNN attn.): measured while attention could use cuDNN's kernels, torch's default "
                  "and this tool's until 2026-11-27. cuDNN plans its attention anew for each new batch shape on "
                  "the host, so these runs trained and generated more slowly than later ones; compare them with "
                  "runs marked alike.", ""]
    if any((r.get("train") or {}).get("compiled") for r in records):
        parts += ["Training times marked (compiled): trained with compiled transformer blocks (`--compile`), which "
                  "compute the same up to rounding at another speed; compare them with runs marked alike.", ""]
    if any(r.get("_superseded") for r in records):
        parts += ["Rows marked (superseded): the test of a rate its learning-rate search later replaced (the search "
                  "went on past its edge and found a lower validation loss); kept as evidence, not in the results "
                  "table.", ""]
    parts += [detailed_table(records), "",
              "## Quality targets", "", "From `peft_nlg/defaults/targets.yaml`, on the results table's runs.", "",
              targets_table(check_targets(chosen, load_targets())), ""]
    if searches:
        parts += ["## Learning-rate search", "",
                  "Each method's default learning rate times the study's factors for the task (the same for "
                  "every method), the same token budget for all; the lowest validation loss (bold) was the only "
                  "one tested.", "", search_table(searches), ""]
    decodings = decoding_table([r for r in chosen.values() if r.get("decoding_search")])
    if decodings:
        rules = sorted({r["decoding_search"]["rule"] for r in chosen.values()
                        if (r.get("decoding_search") or {}).get("candidates")})
        parts += ["## Decoding search", "",
                  f"Where a task declares one (`--search auto`): the rule is {'; '.join(rules)}. Each method's "
                  "test (bold) and its data-size ladder used the winner.", "", decodings, ""]
    return "\n".join(parts)


# what each plot shows, as the README captions it
PLOT_CAPTIONS = {
    "quality_vs_cost.png": "Quality against trainable parameters (log scale, top) and training time (bottom)",
    "peak_memory.png": "Peak training memory per method",
    "learning_curves.png": "Quality against training-set size (each method at its selected learning rate)",
}
# the PNG text chunk that holds a fingerprint of what the plot was drawn from, for `report --check`
PLOT_FINGERPRINT_KEY = "peft-nlg data"


def plot_contents(records: list[dict]) -> dict[str, dict]:
    """What each plot draws, by file name, as plain data: PEFT's three claims (less memory, faster training,
    works on small data), each next to full fine-tuning and zero-shot. Drawing reads nothing else, so a
    fingerprint of this says which records a PNG shows."""
    chosen = _best(records)
    trained = {k: r for k, r in chosen.items() if k[0] != ZERO_SHOT and r.get("train")}
    if not trained:
        return {}

    def floor(task: str) -> float | None:
        record = chosen.get((ZERO_SHOT, task))
        return record["scores"][TASKS[task].main_metric] if record else None

    quality = {}
    for task in TASKS:
        metric = TASKS[task].main_metric
        runs = {m: r for (m, t), r in trained.items() if t == task}
        # cuDNN attention or compilation sets a time apart only from runs without it: marked where a panel has both
        attention_mix = len({_with_cudnn_attention(r["train"], r) for r in runs.values()}) > 1
        compile_mix = len({bool(r["train"].get("compiled")) for r in runs.values()}) > 1
        points = []
        for number, method in enumerate(METHODS):
            r = runs.get(method)
            if r is None:
                continue
            # a time not comparable with a lone run under today's settings is drawn hollow
            why = [note for note, applies in (
                ("shared device", (r["train"].get("concurrent_runs") or 1) > 1),
                ("cuDNN attention", attention_mix and _with_cudnn_attention(r["train"], r)),
                ("compiled", compile_mix and r["train"].get("compiled"))) if applies]
            points.append({"title": ROW_TITLES[method], "color": f"C{number}",  # one colour per method everywhere
                           "trainable_params": max(r["trainable_params"], 1), "score": r["scores"][metric],
                           "train_seconds": r["train"]["train_seconds"], "time_notes": why})
        quality[task] = {"metric": metric, "zero_shot": floor(task), "points": points,
                         "sharing": _sharing(runs.values())}
    contents = {"quality_vs_cost.png": quality}

    names = [m for m in METHODS if any((m, t) in trained for t in TASKS)]
    settings = sorted({_memory_setting(r) for r in trained.values()})
    contents["peak_memory.png"] = {
        "methods": [ROW_TITLES[m] for m in names], "settings": settings,
        "peak_gb": {task: [(trained.get((m, task)) or {}).get("train", {}).get("peak_memory_gb") or 0 for m in names]
                    for task in TASKS}}

    ladder = defaultdict(dict)
    for r in records:
        if r["method"] != ZERO_SHOT and _decoding_chosen(r) and r.get("train") and not r.get("_superseded"):
            ladder[(r["task"], r["method"])][r["train"]["train_examples"]] = r["scores"][TASKS[r["task"]].main_metric]
    if any(len(points) > 1 for points in ladder.values()):
        contents["learning_curves.png"] = {task: {
            "metric": TASKS[task].main_metric, "zero_shot": floor(task),
            "lines": [{"title": ROW_TITLES[m], "points": sorted(ladder[(task, m)].items())}
                      for m in METHODS if len(ladder.get((task, m), {})) > 1]} for task in TASKS}
    return contents


def _memory_setting(record: dict) -> str:
    """Memory grows with the tokens of a forward pass, so the memory plot says how many, and on what."""
    hardware = record.get("hardware") or {}
    where = hardware.get("gpu") or hardware.get("cpu") or "?"
    # resolved sizes since 2026-11-28; before, what the configuration asked (0: the device's default)
    sizes = record["train"].get("batch_sizes") or {"batch_tokens": (record.get("config") or {}).get("batch_tokens")}
    step, limit = sizes["batch_tokens"], sizes.get("max_forward_tokens")
    if not step:
        return f"{where}, the device's default batch size"
    return f"{where}, {step} padded tokens per step" + (f" in passes of at most {limit}" if limit and limit < step
                                                        else "")


def plot_fingerprint(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Draws ``plot_contents`` into PNGs under ``out_dir``, each carrying its content's fingerprint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def zero_shot_line(axis, floor: float | None) -> None:
        if floor is not None:
            axis.axhline(floor, color="grey", linestyle="--", label="zero-shot")

    def finish(axis) -> None:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=axis.transAxes)

    def save(figure, name: str, content: dict) -> None:
        figure.tight_layout()
        written.append(out_dir / name)
        figure.savefig(written[-1], dpi=110, metadata={PLOT_FINGERPRINT_KEY: plot_fingerprint(content)})

    contents = plot_contents(records)
    if not contents:
        return written
    quality = contents["quality_vs_cost.png"]
    figure, axes = plt.subplots(2, len(quality), figsize=(5 * len(quality), 8), squeeze=False)
    for column, (task, panel) in enumerate(quality.items()):
        for point in panel["points"]:
            axes[0, column].scatter(point["trainable_params"], point["score"], label=point["title"],
                                    color=point["color"])
            notes = point["time_notes"]
            axes[1, column].scatter(point["train_seconds"], point["score"],
                                    label=point["title"] + (f" ({', '.join(notes)})" if notes else ""),
                                    facecolors="none" if notes else point["color"], edgecolors=point["color"])
        for row in (0, 1):
            zero_shot_line(axes[row, column], panel["zero_shot"])
            finish(axes[row, column])
        axes[0, column].set(xscale="log", xlabel="trainable parameters", ylabel=panel["metric"], title=task)
        axes[1, column].set(xlabel="training seconds" + (f"\n({panel['sharing']})" if panel["sharing"] else ""),
                            ylabel=panel["metric"])
    save(figure, "quality_vs_cost.png", quality)

    memory = contents["peak_memory.png"]
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(memory["peak_gb"])
    for i, (task, heights) in enumerate(memory["peak_gb"].items()):
        axis.bar([n + i * width for n in range(len(heights))], heights, width, label=task)
    axis.set_xticks([n + width * (len(memory["peak_gb"]) - 1) / 2 for n in range(len(memory["methods"]))],
                    memory["methods"], fontsize=8)
    axis.set(ylabel="peak training memory (GB)",
             title="Peak training memory per method\n" + "; ".join(memory["settings"]))
    axis.legend(fontsize=7)
    save(figure, "peak_memory.png", memory)

    curves = contents.get("learning_curves.png")
    if curves:
        figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
        for column, (task, panel) in enumerate(curves.items()):
            axis = axes[0, column]
            for line in panel["lines"]:
                axis.plot([x for x, _ in line["points"]], [y for _, y in line["points"]], marker="o",
                          label=line["title"])
            zero_shot_line(axis, panel["zero_shot"])
            axis.set(xscale="log", xlabel="training examples", ylabel=panel["metric"], title=task)
            finish(axis)
        save(figure, "learning_curves.png", curves)
    plt.close("all")
    return written


def stale_plots(records: list[dict], records_dir: Path) -> list[str]:
    """One line per plot that is missing or was drawn from other records than ``records`` give."""
    from PIL import Image  # matplotlib's own dependency

    problems = []
    for name, content in plot_contents(records).items():
        path = records_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        with Image.open(path) as image:
            drawn_from = getattr(image, "text", {}).get(PLOT_FINGERPRINT_KEY)
        if drawn_from != plot_fingerprint(content):
            problems.append(f"{path}: drawn from other records than those beside it")
    return problems


def replace_block(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def report(records_dir: Path, check: bool = False, readme: Path = Path("README.md")) -> int:
    records = load_records(records_dir) if records_dir.is_dir() else []
    mixed = mixed_data(records)
    for problem in mixed:
        print(problem, file=sys.stderr)
    if mixed:
        return 1
    # as seen from the README's folder, so the note points to the right file wherever the records are
    details = Path(os.path.relpath(records_dir / "RESULTS.md", readme.parent)).as_posix()
    table = main_table(records, details)
    current = readme.read_text(encoding="utf-8")
    expected = replace_block(current, table)
    results_md = records_dir / "RESULTS.md"
    details_text = results_markdown(records, load_searches(records_dir)) if records else None
    if check:
        problems = [] if expected == current else [f"{readme}: results table differs from the records in {records_dir}"]
        if records:
            if not results_md.is_file() or results_md.read_text(encoding="utf-8") != details_text:
                problems.append(f"{results_md}: differs from the records beside it")
            problems += stale_plots(records, records_dir)
        for problem in problems:
            print(f"{problem}; run `peft-nlg report`", file=sys.stderr)
        if problems:
            return 1
        print(f"{readme}, {records_dir}/RESULTS.md and the plots match {len(records)} record(s) in {records_dir}")
        return 0
    atomic_write_text(readme, expected)
    if records:
        records_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_md, details_text)
        for path in plots(records, records_dir):
            print(f"wrote {path}")
    print(table)
    return 0
