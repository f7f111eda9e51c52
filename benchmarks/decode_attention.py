"""One decoding step's attention on the CPU, by each way our generation can run it: our kernel
(``cpu_kernels.decode_attention``), torch's two batched products (``generation.room_products_attention``) and
SDPA (transformers' ``sdpa_attention_forward``, torch's CPU flash kernel), on the same bf16 tensors of a given
model's shape (grouped heads, left padding, a cache room's unwritten positions masked). Each layer's keys and
values are its own tensors, as in a model, so at large batches they are read from memory, not from the cache.
Prints a table and writes JSON: milliseconds per layer (median and best of the repeats, all ways in alternation)
and each way's largest difference from fp32 attention.

  python benchmarks/decode_attention.py --rows 1 8 40 128 256 --positions 224 --out .dev/decode-attention.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from peft_nlg import cpu_kernels
from peft_nlg.data.io import write_json
from peft_nlg.generation import room_products_attention, sdpa_attention_forward
from peft_nlg.runtime import hardware, package_versions


class _Attention(torch.nn.Module):  # what transformers' attention functions read from their module
    is_causal, training = True, False

    def __init__(self, group: int):
        super().__init__()
        self.num_key_value_groups = group


def tensors(rows: int, kv_heads: int, group: int, positions: int, dim: int, layers: int, seed: int = 0):
    """Per layer: query, keys, values (bf16) and the positions attended (left padding of 0-39 per row, the last 9
    positions unwritten room)."""
    generator = torch.Generator().manual_seed(seed)
    at = torch.arange(positions)
    padding = torch.randint(0, min(40, positions // 2 + 1), (rows,), generator=generator)
    keep = (at >= padding[:, None]) & (at < max(positions - 9, 1))
    made = []
    for _ in range(layers):
        query = torch.randn(rows, kv_heads * group, 1, dim, generator=generator).bfloat16()
        keys, values = (torch.randn(rows, kv_heads, positions, dim, generator=generator).bfloat16() for _ in "kv")
        made.append((query, keys, values))
    return made, keep


def fp32_attention(query, keys, values, keep, scaling):
    rows, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    scores = torch.einsum("bgqd,bgld->bgql", query.float().view(rows, kv_heads, heads // kv_heads, dim),
                          keys.float()) * scaling
    weights = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bgql,bgld->bgqd", weights, values.float()).reshape(rows, 1, heads, dim)


def ways(module: _Attention, keep: torch.Tensor, scaling: float) -> dict:
    additive = torch.zeros(keep.shape[0], 1, 1, keep.shape[1], dtype=torch.bfloat16).masked_fill_(
        ~keep[:, None, None, :], float("-inf"))  # as the products' mask function makes it, once a step
    boolean = keep[:, None, None, :]
    found = {
        "products": lambda q, k, v: room_products_attention(module, q, k, v, additive, scaling=scaling)[0],
        "sdpa": lambda q, k, v: sdpa_attention_forward(module, q, k, v, boolean, scaling=scaling)[0],
    }
    if cpu_kernels.decode_attention_unavailable() is None:
        found = {"kernel": lambda q, k, v: cpu_kernels.decode_attention(q, k, v, keep, scaling), **found}
    return found


def measure(rows: int, args) -> dict:
    layers, keep = tensors(rows, args.kv_heads, args.group, args.positions, args.dim, args.layers)
    scaling = args.dim ** -0.5
    candidates = ways(_Attention(args.group), keep, scaling)
    expected = fp32_attention(*layers[0], keep, scaling)
    result = {"rows": rows, "ways": {}}
    times = {name: [] for name in candidates}
    for name, attend in candidates.items():
        result["ways"][name] = {"max_abs_diff_from_fp32": round(float((attend(*layers[0]).float() - expected)
                                                                      .abs().max()), 5)}
    for _ in range(args.repeats):  # alternating, so that a slower stretch of the machine hits every way alike
        for name, attend in candidates.items():
            started = time.perf_counter()
            for layer in layers:
                attend(*layer)
            times[name].append((time.perf_counter() - started) / len(layers) * 1e3)
    for name, measured in times.items():
        result["ways"][name].update(ms_per_layer_median=round(statistics.median(measured), 3),
                                    ms_per_layer_best=round(min(measured), 3))
    return result


def render(summary: dict) -> str:
    names = list(summary["results"][0]["ways"])
    lines = [f"# {summary['shape']}, bf16, {summary['threads']} threads, {summary['hardware'].get('cpu_model')}",
             "", "| rows | " + " | ".join(f"{name} ms/layer (best)" for name in names)
             + " | " + " | ".join(f"{name} max diff" for name in names) + " |",
             "|---" * (1 + 2 * len(names)) + "|"]
    for row in summary["results"]:
        cells = [f"{row['ways'][n]['ms_per_layer_median']} ({row['ways'][n]['ms_per_layer_best']})" for n in names]
        cells += [str(row["ways"][n]["max_abs_diff_from_fp32"]) for n in names]
        lines.append(f"| {row['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 40, 128, 256])
    ap.add_argument("--positions", type=int, default=224, help="cache room per row, unwritten and padding included")
    ap.add_argument("--kv-heads", type=int, default=3, help="SmolLM2-135M: 3 key/value heads")
    ap.add_argument("--group", type=int, default=3, help="query heads per key/value head (SmolLM2-135M: 3)")
    ap.add_argument("--dim", type=int, default=64, help="head width (SmolLM2-135M: 64)")
    ap.add_argument("--layers", type=int, default=30, help="layers, each with tensors of its own")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True, help="JSON file to write (never overwritten)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"{out}: exists; choose another --out", file=sys.stderr)
        return 2
    summary = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(torch.device("cpu")),
               "versions": package_versions(), "threads": torch.get_num_threads(),
               "shape": f"{args.kv_heads} key/value heads x {args.group} query heads of {args.dim}, "
                        f"{args.positions} positions, {args.layers} layers",
               "kernel": cpu_kernels.decode_attention_unavailable() or "available",
               "results": [measure(rows, args) for rows in args.rows]}
    print(render(summary))
    write_json(out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
