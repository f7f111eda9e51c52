#!/usr/bin/env bash
# The speed benchmark on the lent GPU machine, run from the repository root (see docs/benchmarks.md).
# Usage: scripts/device/bench_slot.sh METHODS [speed.py options...]    e.g. none,lora,prefix_tuning --compile
# Carry .whl, .dev/arch (config + tokenizer) and .dev/bench (a copy of shared/bench/hf_trainer_baseline.py).
# Without .dev/arch (ARCH=DIR names another), the architecture comes from the model a grid call converted on this
# machine while it stays warm; the wheels too stay installed then, so such a call needs only .dev/bench.
# Writes $OUT/bench-<first method>.json after every method (a call cut off at its limit keeps what it
# measured) and $OUT/bench.log (with --profile-steps N also bench-<first>-<method>-{eager,compiled}-profile.txt);
# copy the JSON to benchmarks/results/<date>-<card>.json.
set -euo pipefail
methods=${1:?usage: bench_slot.sh METHODS [speed.py options...]}
shift
source scripts/device/prepare.sh
python3 -m peft_nlg.cli setup -task dialogue
arch=${ARCH:-.dev/arch}
[ -f "$arch/config.json" ] || arch=$PEFT_NLG_CACHE/models/SmolLM2-135M-Instruct
python3 benchmarks/speed.py --arch-dir "$arch" --baseline .dev/bench/hf_trainer_baseline.py \
  --methods "$methods" --out "$out/bench-${methods%%,*}.json" "$@" 2>&1 | tee "$out/bench.log"
