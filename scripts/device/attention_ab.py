"""Summarise grid_slot.sh's comparison of attention kernels: training runs and zero-shot tests made without
and with cuDNN attention (runtime.attention_kernels), in /tmp/ab-<what>-<setting>/. Prints one line each,
then how many test predictions the two settings share (bf16 kernels may round differently)."""

import json
import sys
from pathlib import Path

SETTINGS = ("no-cudnn-attention", "cudnn-attention")


def main(root: Path) -> None:
    for method in ("none", "lora"):
        for setting in SETTINGS:
            path = root / f"ab-{method}-{setting}" / "train_record.json"
            if path.is_file():
                r = json.loads(path.read_text())
                print(f"train {method} {setting}: steady tokens/s {r['steady_tokens_per_s']}, peak GB "
                      f"{r['peak_memory_gb']}, steps {r['steps']}, final train loss {r['history'][-1]['train_loss']}")
    predictions = {}
    for setting in SETTINGS:
        run = root / f"ab-zs-{setting}"
        if (run / "record-test-greedy.json").is_file():
            r = json.loads((run / "record-test-greedy.json").read_text())
            g = r["generation"]
            print(f"zero-shot test {setting}: {g['new_tokens_per_s']} new tokens/s ({g['new_tokens']} tokens in "
                  f"{g['generate_seconds']} s), scores {r['scores']}")
            predictions[setting] = (run / "predictions-test-greedy.jsonl").read_text().splitlines()
    if len(predictions) == 2:
        a, b = predictions.values()
        print(f"identical predictions: {sum(x == y for x, y in zip(a, b, strict=True))} of {len(a)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp"))
