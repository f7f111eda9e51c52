#!/usr/bin/env bash
# One GPU slot of the study grid, run on the lent machine from the repository root (see docs/gpu.md).
# Usage: scripts/device/grid_slot.sh SECONDS [peft-nlg grid options...]
#   SECONDS: the grid starts no run that would end after this; keep it a minute or two under the call's limit.
# Before it: the GGUF parts in /tmp/parts (earlier calls), .whl and .dev/gguf carried on this call.
# Records go to $OUT/records.tgz, refreshed every 20 s, so a call cut off at its limit still returns
# every finished run; unpack it over the checkout's results/ and commit.
set -euo pipefail
limit=${1:?usage: grid_slot.sh SECONDS [grid options...]}
shift
source scripts/device/prepare.sh
if [ ! -f "$PEFT_NLG_CACHE/models/SmolLM2-135M-Instruct/model.safetensors" ]; then
  mkdir -p /tmp/parts && cp .dev/gguf/part-* /tmp/parts/ 2>/dev/null || true
  scripts/device/assemble_model.sh /tmp/parts "$(cat .dev/gguf/SHA256)"
fi
python3 -m peft_nlg.cli setup -task all
mkdir -p results
started=$(date +%s)
snapshot() { tar czf "$out/records.tgz.partial" results && mv "$out/records.tgz.partial" "$out/records.tgz"; }
# runs trained in worker processes (study.yaml: parallel) log to <work dir>/train.log; those come back too
worker_logs() { (cd /tmp && find grid -name train.log 2>/dev/null | tar czf "$out/train-logs.tgz" -T -) || true; }
(while sleep 20; do snapshot; worker_logs; done) &
saver=$!
set +e
python3 -m peft_nlg.cli grid --records results --work-dir /tmp/grid \
  --time-limit $((limit - ($(date +%s) - started))) "$@" 2>&1 | tee "$out/grid.log"
status=${PIPESTATUS[0]}
kill $saver 2>/dev/null
snapshot
worker_logs
python3 -m peft_nlg.cli grid --records results --plan "$@" | tail -1 | tee -a "$out/grid.log"
exit "$status"
