"""Our CPU decoding-attention kernel: SDPA's attention to bf16 precision over the attended positions only, whatever
the shapes it takes; torch's way wherever it cannot run; built once, atomically; used by generation where it runs."""

import pytest
import torch
from test_methods import SOURCES, _loaded
from tiny_models import save_tiny_model

import peft_nlg.generation as generation
from peft_nlg import cpu_kernels
from peft_nlg.generation import DecodingSettings, generate

CPU = torch.device("cpu")
WHY_NOT = cpu_kernels.decode_attention_unavailable()
needs_kernel = pytest.mark.skipif(WHY_NOT is not None, reason=f"the decoding attention kernel: {WHY_NOT}")


def _case(rows, kv_heads, group, positions, dim, seed=0):
    """bf16 query, keys, values and the positions attended: left padding of 0-3 per row, the last 0-4 positions
    unwritten (holding +-1e4, which would swamp the output if they leaked in), one row with nothing attended."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, kv_heads * group, 1, dim, generator=generator).bfloat16()
    keys, values = (torch.randn(rows, kv_heads, positions, dim, generator=generator).bfloat16() for _ in range(2))
    padding = torch.randint(0, min(4, positions), (rows,), generator=generator)
    written = positions - int(torch.randint(0, min(5, positions), (1,), generator=generator))
    keys[..., written:, :], values[..., written:, :] = 1e4, -1e4
    at = torch.arange(positions)
    keep = (at >= padding[:, None]) & (at < written)
    if rows > 2:
        keep[2] = False
    return query, keys, values, keep


def _reference(query, keys, values, keep, scaling):
    """SDPA's attention in fp32 (grouped query heads next to each other), zero where nothing is attended."""
    rows, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scores = torch.einsum("bgqd,bgld->bgql", query.float().view(rows, kv_heads, group, dim), keys.float()) * scaling
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bgql,bgld->bgqd", weights, values.float()).reshape(rows, 1, heads, dim)


@needs_kernel
@pytest.mark.parametrize(("rows", "kv_heads", "group", "positions", "dim"), [
    (4, 3, 3, 224, 64),   # SmolLM2-135M's heads
    (3, 1, 1, 1, 64),     # one position
    (5, 2, 5, 17, 64),    # five query heads a key/value head: two passes over the values (four, then one)
    (3, 2, 4, 33, 32),    # an odd number of positions: the last pair's second position weighs 0
    (3, 1, 2, 16, 128),   # the widest heads it takes: two query heads a pass
    (3, 2, 3, 100, 96),
])
def test_decode_attention_kernel_is_sdpa_to_bf16_precision(rows, kv_heads, group, positions, dim):
    query, keys, values, keep = _case(rows, kv_heads, group, positions, dim)
    ours = cpu_kernels.decode_attention(query, keys, values, keep, 0.3)
    expected = _reference(query, keys, values, keep, 0.3)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 1, kv_heads * group, dim)
    # bf16 weights and outputs: a few units of the 8th bit on values of size ~1
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)
    if rows > 2:
        assert not ours[2].any()  # nothing attended: zeros, not NaN
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same numbers (each row's sums do not depend on the split)
    try:
        assert torch.equal(cpu_kernels.decode_attention(query, keys, values, keep, 0.3), ours)
    finally:
        torch.set_num_threads(threads)


def test_decode_attention_kernel_declines_what_it_does_not_take():
    query, keys, values, keep = _case(2, 1, 3, 20, 64)
    declined = {
        "fp32": (query.float(), keys.float(), values.float(), keep),
        "heads 48 wide": (query[..., :48], keys[..., :48].contiguous(), values[..., :48].contiguous(), keep),
        "strided keys": (query, keys.transpose(2, 3).contiguous().transpose(2, 3), values, keep),
        "two query positions": (query.expand(2, 3, 2, 64), keys, values, keep),
        "an additive mask": (query, keys, values, torch.zeros(keep.shape)),
    }
    for name, args in declined.items():
        assert cpu_kernels.decode_attention(*args, 0.125) is None, name


def test_the_kernel_fits_models_by_their_head_widths():
    from transformers import LlamaConfig
    assert cpu_kernels.decode_attention_misfit(LlamaConfig(hidden_size=576, num_attention_heads=9,
                                                           num_key_value_heads=3)) is None
    assert "8 wide" in cpu_kernels.decode_attention_misfit(LlamaConfig(hidden_size=32, num_attention_heads=4))
    assert "do not group" in cpu_kernels.decode_attention_misfit(
        LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=3, head_dim=64))


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """An empty kernel cache and no kernel loaded yet; afterwards the process's kernel as it was."""
    monkeypatch.setenv("PEFT_NLG_CACHE", str(tmp_path))
    cpu_kernels._decode_attention.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels._decode_attention.cache_clear()


def test_a_failing_compiler_leaves_nothing_behind_and_decoding_falls_back(fresh_kernel_state, monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'fatal: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512_bf16", lambda: True)
    why_not = cpu_kernels.decode_attention_unavailable()
    assert why_not.startswith("could not be built") and "fatal: no" in why_not
    assert not list(fresh_kernel_state.iterdir())  # no partial library left for a later run to load
    with pytest.raises(ValueError, match="decode_attention kernel: could not be built"):
        generation.decoding_attention_for("kernel", True, CPU, torch.bfloat16, _llama_config(64))
    auto = generation.decoding_attention_for("auto", True, CPU, torch.bfloat16, _llama_config(64))
    assert (auto(256), auto(8)) == (generation.ROOM_PRODUCTS, None)


def test_the_kernels_can_be_turned_off(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("PEFT_NLG_CPU_KERNELS", "0")
    assert cpu_kernels.decode_attention_unavailable() == "turned off (PEFT_NLG_CPU_KERNELS=0)"
    query, keys, values, keep = _case(2, 1, 3, 20, 64)
    assert cpu_kernels.decode_attention(query, keys, values, keep, 0.125) is None


@needs_kernel
def test_the_kernel_is_built_once_per_source(fresh_kernel_state, monkeypatch):
    first = cpu_kernels.build("decode_attention")
    assert first.parent == fresh_kernel_state and first.stat().st_size > 0
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build("decode_attention") == first and first.stat().st_mtime_ns == stamp  # reused
    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-DSOMETHING_ELSE"))
    assert cpu_kernels.build("decode_attention") != first  # other flags: another library
    assert sorted(path.name.startswith(".") for path in fresh_kernel_state.iterdir()) == [False, False]


def _llama_config(head_dim):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)


def test_decoding_attention_choice_by_setting_device_dtype_and_model(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "decode_attention_unavailable", lambda: None)
    choose = generation.decoding_attention_for
    kernel, products = generation.ROOM_KERNEL, generation.ROOM_PRODUCTS
    assert choose("auto", True, CPU, torch.bfloat16, _llama_config(32))(1) == kernel
    assert choose("auto", True, CPU, torch.bfloat16, _llama_config(8))(256) == products  # too narrow heads
    assert choose("auto", True, CPU, torch.float32, _llama_config(32))(256) == products  # the kernel is bf16
    assert choose("auto", True, CPU, torch.float32, _llama_config(32))(127) is None
    assert choose("auto", False, CPU, torch.bfloat16, _llama_config(32))(256) is None  # transformers' loop
    assert choose("auto", True, torch.device("cuda"), torch.bfloat16, _llama_config(32))(256) is None
    assert choose("sdpa", True, CPU, torch.bfloat16, _llama_config(32))(256) is None
    assert choose("products", True, CPU, torch.bfloat16, _llama_config(32))(1) == products
    for dtype, config, message in ((torch.float32, _llama_config(32), "not in float32"),
                                   (torch.bfloat16, _llama_config(8), "8 wide")):
        with pytest.raises(ValueError, match=message):
            choose("kernel", True, CPU, dtype, config)
    with pytest.raises(ValueError, match="must be auto, kernel, products or sdpa"):
        choose("flash", True, CPU, torch.bfloat16, _llama_config(32))


@pytest.fixture(scope="module")
def wide_head_llama(tmp_path_factory):
    """The tiny Llama with heads 32 wide (the kernel's narrowest), in bf16, its weights perturbed from init."""
    directory = save_tiny_model("llama", tmp_path_factory.mktemp("llama-hd32"), head_dim=32)
    loaded = _loaded(directory, "none")
    loaded.model.to(torch.bfloat16).eval()
    return loaded


def _shared_start(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _decode(loaded, sources, search, attention):
    settings = DecodingSettings(search=search, max_new_tokens=40, decode_attention=attention)
    return generate(loaded.model, loaded.tokenizer, loaded.prompter, sources, settings, CPU, torch.bfloat16,
                    show_progress=False)


@needs_kernel
def test_greedy_decoding_with_the_kernel_writes_what_sdpa_writes(wide_head_llama):
    """Greedy decoding with the kernel, its rows leaving the batch as they finish and its cache rooms growing,
    writes what decoding with SDPA's attention writes, up to where a bf16 near-tie flips a token: on this random
    model that came after 25 of 40 tokens or later, for the kernel as for the batched products (each rounds
    differently from SDPA). A wrong mask or cache room would part from the first tokens."""
    sources = [*SOURCES, *(source[::-1] for source in SOURCES)]
    (theirs, theirs_stats), (ours, ours_stats) = (_decode(wide_head_llama, sources, "greedy", attention)
                                                  for attention in ("sdpa", "kernel"))
    # "room kernel" alone: no decoding step passed to the products
    assert (theirs_stats["decode_attention"], ours_stats["decode_attention"]) == ("as loaded", "room kernel")
    assert ours_stats["new_tokens"] > len(sources) * 20
    for a, b in zip(ours, theirs, strict=True):
        assert _shared_start(a, b) >= len(b) // 2, (a, b)
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= len(sources) // 2


@needs_kernel
def test_beam_search_with_the_kernel_stays_as_close_to_sdpa_as_the_products(wide_head_llama):
    """Beam search (transformers' cache, whose keys are contiguous too) by the kernel: its outputs share with
    SDPA's about as much as the batched products' do. Beams of a random model are near-ties: one of six outputs
    parted from SDPA's within 4 characters with either (measured), so the check is on the total."""
    sources = [*SOURCES, *(source[::-1] for source in SOURCES)]
    results = {attention: _decode(wide_head_llama, sources, "beam", attention)
               for attention in ("sdpa", "kernel", "products")}
    assert results["kernel"][1]["decode_attention"] == "room kernel"
    theirs = results["sdpa"][0]
    shared = {attention: sum(_shared_start(a, b) for a, b in zip(results[attention][0], theirs, strict=True))
              for attention in ("kernel", "products")}
    assert shared["kernel"] >= 0.8 * shared["products"] and shared["kernel"] >= sum(map(len, theirs)) // 2, shared


@needs_kernel
def test_statistics_say_when_the_kernel_declined_steps(wide_head_llama, monkeypatch):
    loaded = wide_head_llama
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *args: None)
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES, DecodingSettings(
        max_new_tokens=5, decode_attention="kernel"), CPU, torch.bfloat16, show_progress=False)
    # 2 layers, each of at least 3 decoding steps (5 tokens: the prefill gives the first), none taken by the kernel
    assert stats["decode_attention"].startswith("room kernel in 1 of 1 batches, room products for ")
    assert int(stats["decode_attention"].split("room products for ")[1].split()[0]) >= 2 * 3
