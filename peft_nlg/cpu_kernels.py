"""Kernels of our own for the CPU, written in C (``peft_nlg/csrc``) and compiled on first use into the cache
directory. Each is used only where it can run (the CPU's instruction set, a C compiler, the tensors' shapes and
dtypes); everywhere else the caller keeps torch's ops, so a machine without a compiler loses speed, not function.
``PEFT_NLG_CPU_KERNELS=0`` turns them off.

decode_attention: one decoding step's attention over a bf16 cache (``generation.room_kernel_attention``). On the
2-core AVX-512 EPYC, for 256 rows, 3 key/value heads of 64 and 224 cached positions, 30 layers' caches in turn,
it took 1.8-2.0 ms per layer against 4.7-9.9 ms for the two batched products it replaces and reads the cache at
about the memory's speed (micro-benchmark, 2026-12-07; docs/benchmarks.md has the whole-generation numbers).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from peft_nlg.models import cache_dir
from peft_nlg.runtime import cpu_has_avx512_bf16

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
SWITCH = "PEFT_NLG_CPU_KERNELS"
# the instruction sets named, not -march=native: the library then runs on any CPU that has them, whichever built it;
# OpenMP for the rows: its runtime is libgomp, the one torch's wheels load, so both share one pool of threads
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
DECODE_ATTENTION_MAX_DIM = 128  # MAX_DIM in decode_attention.c


@functools.cache
def _decode_attention() -> tuple[object | None, str]:
    """The compiled kernel's entry point, or None and why not."""
    if os.environ.get(SWITCH, "1") == "0":
        return None, f"turned off ({SWITCH}=0)"
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None, f"built for Linux on x86-64 only, not {sys.platform} on {platform.machine()}"
    if not cpu_has_avx512_bf16():
        return None, "this CPU has no AVX512-BF16"
    try:
        library = ctypes.CDLL(str(build("decode_attention")))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        reason = f"could not be built: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}"
        log.warning("peft-nlg's CPU decoding attention %s; decoding attends by torch's batched products", reason)
        return None, reason
    entry = library.peft_nlg_decode_attention
    entry.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    entry.restype = ctypes.c_int
    return entry, "built"


def decode_attention_unavailable() -> str | None:
    """Why the decoding attention kernel cannot run here, or None when it can (building it on first call)."""
    entry, reason = _decode_attention()
    return None if entry is not None else reason


def decode_attention_misfit(config) -> str | None:
    """Why the kernel cannot take this model's decoder attention (its head widths), or None when it can."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "decoder_attention_heads", None)
    if not heads:
        return "the model's attention heads are not named in its config"
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or text.hidden_size // heads
    if heads % kv_heads:
        return f"{heads} query heads do not group onto {kv_heads} key/value heads"
    if dim % 32 or dim > DECODE_ATTENTION_MAX_DIM:
        return f"heads are {dim} wide; it takes multiples of 32 up to {DECODE_ATTENTION_MAX_DIM}"
    return None


def build(name: str) -> Path:
    """``csrc/<name>.c`` compiled into a shared library in the cache, once per source, compiler and flags; the
    file appears whole or not at all (compiled under a temporary name, then renamed)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on the PATH")
    source = SOURCES / f"{name}.c"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", partial, str(source)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed on {source}: {result.stderr.strip() or result.returncode}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    log.info("built %s", target)
    return target


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                     scaling: float) -> torch.Tensor | None:
    """One decoding step's attention, or None where the kernel cannot take these tensors (the caller attends its
    own way): ``query`` [rows, heads, 1, dim], ``key`` and ``value`` [rows, kv_heads, positions, dim], contiguous,
    all bf16 on the CPU, ``heads`` a multiple of ``kv_heads`` (grouped query heads next to each other, as
    transformers' ``repeat_kv`` groups them), ``dim`` a multiple of 32 up to 128; ``keep`` [rows, positions] bool,
    True where attended. Returns [rows, 1, heads, dim] bf16."""
    rows, heads, query_positions, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    fits = (query_positions == 1 and positions > 0 and heads % kv_heads == 0
            and dim % 32 == 0 and dim <= DECODE_ATTENTION_MAX_DIM
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (query, key, value))
            and key.shape == value.shape == (rows, kv_heads, positions, dim)
            and key.is_contiguous() and value.is_contiguous()
            and keep.dtype == torch.bool and keep.shape == (rows, positions))
    if not fits:
        return None
    entry, _ = _decode_attention()
    if entry is None:
        return None
    query, keep = query.contiguous(), keep.contiguous()
    out = torch.empty(rows, 1, heads, dim, dtype=torch.bfloat16)
    with torch.profiler.record_function("peft_nlg::decode_attention"):  # a call torch's profiler cannot see else
        status = entry(query.data_ptr(), key.data_ptr(), value.data_ptr(), keep.data_ptr(), out.data_ptr(),
                       rows, kv_heads, heads // kv_heads, positions, dim, scaling, torch.get_num_threads())
    if status:
        raise RuntimeError(f"decode_attention kernel failed ({status}) on rows={rows} heads={heads} "
                           f"kv_heads={kv_heads} positions={positions} dim={dim}")
    return out
