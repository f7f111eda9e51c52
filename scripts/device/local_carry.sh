#!/usr/bin/env bash
# Build, in a checkout on the development machine, everything a GPU call carries besides the repository
# (docs/gpu.md): .whl (the project's pinned wheels for the machine's Python 3.12), .dev/arch (the embedded
# model's config and tokenizer, for the speed benchmark), .dev/bench (the reference recipe) and .dev/gguf (the
# model's GGUF in two parts, for the study grid). All are git-ignored through .git/info/exclude. A fresh clone
# needs this once (about a minute, the model conversion included); existing pieces are kept.
# Usage: scripts/device/local_carry.sh [RECIPE]   (default RECIPE: ../shared/bench/hf_trainer_baseline.py)
set -euo pipefail
recipe=${1:-../shared/bench/hf_trainer_baseline.py}
mkdir -p .git/info
for ignored in /.whl/ /.dev/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
if ! compgen -G ".whl/transformers-*.whl" >/dev/null; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.24.0 peft==0.21.2 nltk regex==2026.4.4 gguf==0.19.0
  (cd .whl && python3 -m pip wheel -q --no-deps rouge-score==0.1.2 -w .)
fi
model=$(python3 -c 'from peft_nlg.models import ensure_embedded_model; print(ensure_embedded_model())' | tail -1)
mkdir -p .dev/arch .dev/bench
cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .dev/arch/
cp "$recipe" .dev/bench/hf_trainer_baseline.py
[ -s .dev/gguf/SHA256 ] || bash scripts/device/split_model.sh .dev/gguf >/dev/null
du -sh .whl .dev/arch .dev/bench .dev/gguf
