#!/usr/bin/env bash
# One GPU slot of the study grid, run on the lent machine from the repository root (see docs/gpu.md).
# Usage: scripts/device/grid_slot.sh SECONDS [peft-nlg grid options...]
#   SECONDS: counted from this script's start (model assembly and profiling included), the grid starts no
#   run that would end after it; keep it a minute or two under the call's limit.
# Before it: the GGUF parts in /tmp/parts (earlier calls), .whl and .dev/gguf carried on this call.
# Records go to $OUT/records.tgz, refreshed every 20 s, so a call cut off at its limit still returns
# every finished run; unpack it over the checkout's results/ and commit. RECORDS=DIR keeps them in another
# folder of the checkout (a side experiment, kept out of the study's table).
# PROFILE=1 first profiles 3 training steps of full fine-tuning and of LoRA on a GPU (about 20 s; off by default
# since two sessions' profiles are in, leaving the slot to the grid);
# ATTENTION_AB=1 also compares attention kernels. At most 8 files come back from $OUT, so only four go there:
# gpu.txt, records.tgz, attention-ab.txt and logs.tgz (grid.log, the profiles, every run's log); the rest goes
# to $logs.
set -euo pipefail
limit=${1:?usage: grid_slot.sh SECONDS [grid options...]}
shift
started=$(date +%s)
records=${RECORDS:-results}
work=grid  # under /tmp; a side experiment's runs get their own, so they never replace the study's models
[ "$records" = results ] || work=grid-$(basename "$records")
source scripts/device/prepare.sh
logs=/tmp/slot-logs
rm -rf "$logs" && mkdir -p "$logs"
if [ ! -f "$PEFT_NLG_CACHE/models/SmolLM2-135M-Instruct/model.safetensors" ]; then
  mkdir -p /tmp/parts && cp .dev/gguf/part-* /tmp/parts/ 2>/dev/null || true
  scripts/device/assemble_model.sh /tmp/parts "$(cat .dev/gguf/SHA256)"
fi
python3 -m peft_nlg.cli setup -task all
on_gpu() { ! grep -q "no GPU" "$out/gpu.txt"; }
if on_gpu && [ "${PROFILE:-0}" = 1 ]; then
  # where a training step's time goes on this card (issue 4): 3 profiled steps each of full fine-tuning and
  # LoRA at the grid's batch size, about 10 s each
  for method in none lora; do
    python3 -m peft_nlg.cli train --task translation --method "$method" --output-dir "/tmp/profile-$method" \
      --overwrite --max-steps 9 --batch-tokens 16384 --max-valid-examples 16 --no-save-checkpoints \
      --report-to none --profile-steps 3 >"$logs/profile-$method.log" 2>&1 \
      && cp "/tmp/profile-$method/profile.txt" "$logs/profile-$method.txt" || true
  done
fi
if on_gpu && [ "${ATTENTION_AB:-0}" = 1 ]; then
  # what leaving cuDNN out of attention buys (runtime.attention_kernels), about 70 s: 40 training steps of each
  # method at the grid's batch size and a zero-shot greedy test of 300 sentences, each without and with cuDNN;
  # summary in $out/attention-ab.txt (measured 2026-11-27: benchmarks/results/attention/)
  for attention in no-cudnn-attention cudnn-attention; do
    for method in none lora; do
      python3 -m peft_nlg.cli train --task translation --method "$method" --output-dir "/tmp/ab-$method-$attention" \
        --overwrite --max-steps 40 --batch-tokens 16384 --max-valid-examples 16 --no-save-checkpoints \
        --report-to none "--$attention" >"$logs/ab-$method-$attention.log" 2>&1 || true
    done
    python3 -m peft_nlg.cli test --zero-shot --task translation --output-dir "/tmp/ab-zs-$attention" --overwrite \
      --search greedy --max-test-examples 300 "--$attention" >"$logs/ab-zs-$attention.log" 2>&1 || true
  done
  python3 scripts/device/attention_ab.py /tmp | tee "$out/attention-ab.txt" || true
fi
mkdir -p "$records"
# each archive is written beside and then renamed, so a call cut off mid-write still returns the previous one
pack() { tar czf "$out/$1.partial" "${@:2}" && mv "$out/$1.partial" "$out/$1" || true; }
# runs trained in worker processes (study.yaml: parallel) log to <work dir>/train.log; those come back too
snapshot() {
  pack records.tgz "$records"
  (cd /tmp && find "$work" -name train.log 2>/dev/null >"$logs/train-logs.txt"
   pack logs.tgz slot-logs $(cat "$logs/train-logs.txt")) || true
}
(while sleep 20; do snapshot; done) &
saver=$!
set +e
python3 -m peft_nlg.cli grid --records "$records" --work-dir "/tmp/$work" \
  --time-limit $((limit - ($(date +%s) - started))) "$@" 2>&1 | tee "$logs/grid.log"
status=${PIPESTATUS[0]}
kill $saver 2>/dev/null
python3 -m peft_nlg.cli grid --records "$records" --plan "$@" | tail -1 | tee -a "$logs/grid.log"
snapshot
exit "$status"
