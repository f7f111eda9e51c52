# Sourced by the *_slot.sh scripts on the lent GPU machine: $out for what comes back, the carried wheels
# installed (the project's pins, where the machine has other versions), the environment, the card's name.
out=${OUT:-/tmp/out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# expandable segments: less fragmentation when several runs share the card (study.yaml: parallel)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PEFT_NLG_CACHE=${PEFT_NLG_CACHE:-/tmp/peft-nlg-cache}
python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' \
  | tee "$out/gpu.txt"
