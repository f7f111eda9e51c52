"""Our greedy decoding loop and the packed linear weights: the same tokens as transformers' own loop, for
every method on every architecture, including rows that stop early; cheaper steps are the only difference."""

import contextlib

import pytest
import torch
from test_methods import SOURCES, _perturbed
from tiny_models import ARCHITECTURES

import peft_nlg.generation as generation
from peft_nlg.generation import DecodingSettings, first_argmax, generate
from peft_nlg.methods import METHODS

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_argmax_with_ties_tails_and_masked_scores(dtype):
    generator = torch.Generator().manual_seed(0)
    for vocab in (64, 333, 1024):  # a multiple of the block and two that leave a short last block
        scores = torch.randn(40, vocab, generator=generator).to(dtype)
        scores[0] = 1.0                                  # every score tied: the first index
        scores[1, [5, 17, 200 % vocab]] = 9.0            # ties across blocks: the first block's
        scores[2, [20, 21]] = 9.0                        # ties inside one block
        scores[3, vocab - 1] = 9.0                       # the maximum in the (short) last block, last position
        scores[4, :-1] = float("-inf")                   # all but the last ruled out
        scores[5, 3:] = float("-inf")
        expected = scores.argmax(-1)
        assert torch.equal(first_argmax(scores, block=16), expected)
        assert torch.equal(first_argmax(scores, block=1024), expected)  # falls back for small vocabularies
    assert first_argmax(scores, block=16)[[0, 1, 2, 3, 4]].tolist() == [0, 5, 20, vocab - 1, vocab - 1]


@pytest.fixture
def small_argmax_block(monkeypatch):
    """Tiny models have 320 tokens: a block of 16 makes the two-pass argmax run in these tests."""
    monkeypatch.setattr(generation, "ARGMAX_BLOCK", 16)


def _stop_some_rows_early(loaded):
    """EOS becomes the first choice of the batch's second row at the third step, of every row at the seventh,
    and never before."""
    eos, calls = loaded.tokenizer.eos_token_id, []

    def hook(module, args, logits):
        calls.append(1)
        logits[:, -1, eos] = -1e4
        if len(calls) == 3:
            logits[1, -1, eos] = 1e4
        if len(calls) == 7:
            logits[:, -1, eos] = 1e4
        return logits

    return loaded.model.get_output_embeddings().register_forward_hook(hook), calls


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_our_greedy_loop_writes_transformers_tokens(tiny_models, arch, method, small_argmax_block):
    loaded = _perturbed(tiny_models[arch], method)
    results, sequences = {}, {"transformers": [], "ours": []}
    own_generate = loaded.model.generate

    def recording_generate(*args, **kwargs):  # every id, padding of finished rows included
        ids = own_generate(*args, **kwargs)
        sequences["ours" if "custom_generate" in kwargs else "transformers"].append(ids)
        return ids

    loaded.model.generate = recording_generate
    for loop in ("transformers", "ours"):
        for no_repeat in (0, 3):
            settings = DecodingSettings(max_new_tokens=12, no_repeat_ngram=no_repeat, greedy_loop=loop)
            texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES, settings, CPU,
                                    show_progress=False)
            results[loop, no_repeat] = texts, stats["new_tokens"]
        handle, calls = _stop_some_rows_early(loaded)
        texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES,
                                DecodingSettings(max_new_tokens=12, greedy_loop=loop), CPU, show_progress=False)
        handle.remove()
        results[loop, "stops"] = texts, stats["new_tokens"], len(calls)
        assert stats["decoding_loop"] == ("peft-nlg greedy" if loop == "ours" else "transformers")
    for key in ((0,), (3,), ("stops",)):
        assert results[("ours", *key)] == results[("transformers", *key)], key
    assert len(sequences["ours"]) == len(sequences["transformers"]) == 3
    for ours, theirs in zip(sequences["ours"], sequences["transformers"], strict=True):
        assert torch.equal(ours, theirs)
    texts, new_tokens, head_calls = results["ours", "stops"]
    # the second row stopped after 2 tokens, the others after 6; nobody runs past the last row's EOS
    assert new_tokens == 2 + 6 * (len(SOURCES) - 1) and head_calls == 7
    assert results["ours", 0][1] > new_tokens  # without the forced EOS the rows ran longer: the check bites


# sources of many lengths, so that groups of rows drop different numbers of padding columns
MANY_SOURCES = [" ".join(["word"] * n) + f" {n}?" for n in (1, 9, 3, 14, 5, 2, 11, 7, 4)]


def record_whether_it_applied(monkeypatch, name: str) -> list[bool]:
    """Wrap the prefill ``generation.<name>`` (None where it does not apply); the returned list gets, per call,
    whether it applied."""
    applied, own = [], getattr(generation, name)

    def recording(*args, **kwargs):
        outputs = own(*args, **kwargs)
        applied.append(outputs is not None)
        return outputs

    monkeypatch.setattr(generation, name, recording)
    return applied


def record_grouped_prefills(monkeypatch, rows: int) -> list[bool]:
    """Prefill in groups of ``rows``; the returned list gets, per greedy generate call, whether it did."""
    monkeypatch.setattr(generation, "PREFILL_ROWS", rows)
    return record_whether_it_applied(monkeypatch, "prefill_by_length")


def test_shared_prefix_length_counts_the_common_real_tokens_and_leaves_each_row_one():
    pad = 0
    rows = [[pad, pad, 5, 6, 7, 8, 9], [5, 6, 7, 1, 2, 3, 4], [pad, 5, 6, 7, 8, 2, 2]]
    ids = torch.tensor(rows)
    lengths = (ids != pad).sum(1)
    assert generation.shared_prefix_length(ids, lengths) == 3  # 5 6 7, wherever each row starts
    same = torch.tensor([[pad, 5, 6, 7], [5, 6, 7, 8]])
    assert generation.shared_prefix_length(same, (same != pad).sum(1)) == 2  # the shorter row keeps its last token
    differ = torch.tensor([[pad, 4, 6, 7], [5, 6, 7, 8]])
    assert generation.shared_prefix_length(differ, (differ != pad).sum(1)) == 0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_in_groups_of_similar_length_writes_transformers_tokens(tiny_models, arch, method, monkeypatch):
    """The prefill in groups of rows (each group without the padding columns it does not need), with or
    without the prompts' common beginning computed once, gives the same tokens as transformers' one-call
    prefill; it runs for every decoder-only model, prompt-learning methods' virtual tokens computed once as
    the first columns of every row, and encoder-decoders keep the one-call prefill."""
    loaded = _perturbed(tiny_models[arch], method)
    grouped = record_grouped_prefills(monkeypatch, rows=2)
    shared_lengths, own_shared_length = [], generation.shared_prefix_length
    texts = {}
    for loop in ("transformers", "ours", "ours without a shared beginning"):
        monkeypatch.setattr(generation, "shared_prefix_length", (
            lambda ids, lengths: shared_lengths.append(own_shared_length(ids, lengths)) or shared_lengths[-1])
            if loop == "ours" else (lambda ids, lengths: 0))
        settings = DecodingSettings(max_new_tokens=10, greedy_loop=loop.split()[0])
        texts[loop] = generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES, settings, CPU,
                               show_progress=False)[0]
    assert texts["ours"] == texts["transformers"] == texts["ours without a shared beginning"]
    assert sum(map(len, texts["ours"])) > 0
    decoder_only = not loaded.prompter.family.is_encoder_decoder
    assert grouped == [decoder_only] * 2
    # the system turn and the instruction's first tokens: what every prompt's token list begins with
    prompts = loaded.prompter.prompts(MANY_SOURCES)
    common = next(n for n in range(len(prompts[0]) + 1)
                  if n == min(map(len, prompts)) - 1 or len({tuple(p[:n + 1]) for p in prompts}) > 1)
    assert shared_lengths == ([common] if decoder_only else []) and (common > 10 or not decoder_only)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_beam_search_prefilling_each_prompt_once_writes_transformers_tokens(tiny_models, arch, method, monkeypatch):
    """Beam search with each prompt prefilled once for all its beams writes transformers' token ids (every beam
    hypothesis kept and reordered as before); it shares the prefill for every decoder-only model (a
    prompt-learning method's virtual tokens added once per prompt), and encoder-decoders keep transformers'."""
    loaded = _perturbed(tiny_models[arch], method)
    shared = record_whether_it_applied(monkeypatch, "_prefill_once_per_prompt")
    sequences, own_generate = {}, loaded.model.generate

    def recording_generate(*args, **kwargs):
        ids = own_generate(*args, **kwargs)
        sequences["ours" if "custom_generate" in kwargs else "transformers"] = ids
        return ids

    loaded.model.generate = recording_generate
    reorders = {generation.RoomyLayer: [], generation.CopiesLayer: []}

    def recording(calls: list, own):
        def reorder_cache(layer, beam_idx):
            calls.append(layer.copies)  # 3: the layer still knew each prompt's beams held copies of one row
            own(layer, beam_idx)
        return reorder_cache

    for layer_class, calls in reorders.items():
        monkeypatch.setattr(layer_class, "reorder_cache", recording(calls, layer_class.reorder_cache))
    texts = {}
    for loop in ("transformers", "ours"):
        settings = DecodingSettings(search="beam", num_beams=3, max_new_tokens=8, greedy_loop=loop)
        texts[loop], stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES, settings, CPU,
                                      show_progress=False)
        assert stats["decoding_loop"] == ("peft-nlg beam (one prefill per prompt)" if loop == "ours"
                                          else "transformers")
    assert torch.equal(sequences["ours"], sequences["transformers"]) and sum(map(len, texts["ours"])) > 0
    decoder_only = not loaded.prompter.family.is_encoder_decoder
    assert shared == [decoder_only]
    # every step's reorder ran on rooms; with one prefill per prompt, leaving the prompts' positions in place;
    # an encoder-decoder's cross-attention, each prompt's encoder output once per beam, was never copied
    assert reorders[generation.RoomyLayer] and set(reorders[generation.RoomyLayer]) == {3 if decoder_only else 1}
    assert set(reorders[generation.CopiesLayer]) == (set() if decoder_only else {3})


def _stop_rows_by_their_padding(loaded) -> tuple[list, list[int]]:
    """EOS becomes a row's first choice at decoding step 2 + (its prompt's padding columns mod 6), and never
    otherwise: the sources' lengths differ, so rows stop at several steps, decided by what each row is, not
    where it sits in the batch; both loops stop the same rows whatever company the rows keep. Returns the hooks'
    handles and the rows of each decoding step."""
    model, eos = loaded.model, loaded.tokenizer.eos_token_id
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "decoder_input_ids" if base.config.is_encoder_decoder else "input_ids"
    padding, step_rows = [], []

    def remember_padding(_module, _args, kwargs):
        ids, mask = kwargs.get(name), kwargs.get("attention_mask")
        one_new_token = ids is not None and ids.shape[1] == 1  # not a decoder-only prompt's prefill
        padding.append(mask.shape[1] - mask.sum(1) if one_new_token and mask is not None else None)

    def force(_module, _args, logits):
        logits[:, -1, eos] = -1e4
        if padding[-1] is not None:
            step_rows.append(len(padding[-1]))
            logits[padding[-1] % 6 + 2 == len(step_rows), -1, eos] = 1e4
        return logits

    handles = [base.register_forward_pre_hook(remember_padding, with_kwargs=True),
               model.get_output_embeddings().register_forward_hook(force)]
    return handles, step_rows


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finished_rows_leave_the_batch_and_the_tokens_stay_transformers(tiny_models, arch, method, monkeypatch):
    """With finished rows dropped from the batch as soon as any row finishes, our loop writes transformers'
    token ids, padding after each row's end included, while its steps run on fewer and fewer rows."""
    loaded = _perturbed(tiny_models[arch], method)
    monkeypatch.setattr(generation, "DROP_FINISHED_SHARE", 0.0)
    sequences, rows_seen, own_generate = {}, {}, loaded.model.generate

    def recording_generate(*args, **kwargs):
        ids = own_generate(*args, **kwargs)
        sequences["ours" if "custom_generate" in kwargs else "transformers"] = ids
        return ids

    loaded.model.generate = recording_generate
    for loop in ("transformers", "ours"):
        handles, rows_seen[loop] = _stop_rows_by_their_padding(loaded)
        generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES,
                 DecodingSettings(max_new_tokens=12, greedy_loop=loop), CPU, show_progress=False)
        for handle in handles:
            handle.remove()
    ours, theirs = sequences["ours"], sequences["transformers"]
    assert torch.equal(ours, theirs)
    generated = theirs[:, -12:]
    ends = {int(row.tolist().index(loaded.tokenizer.eos_token_id)) for row in generated
            if loaded.tokenizer.eos_token_id in row.tolist()}
    assert len(ends) >= 3  # rows ended at three steps at least: the dropping had something to do
    assert set(rows_seen["transformers"]) == {len(MANY_SOURCES)}
    assert rows_seen["ours"] == sorted(rows_seen["ours"], reverse=True) and rows_seen["ours"][-1] < len(MANY_SOURCES)


def test_roomy_cache_layer_keeps_what_concatenation_keeps_and_grows():
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(2, 3, 4, 5, generator=generator) for _ in range(2)]
    roomy = generation.RoomyLayer.after(*first, room=1)
    plain = generation.DynamicLayer()
    plain.update(*first)
    for new in (1, 7, 1):  # the second step needs more room than the layer holds, the third runs out again
        states = [torch.randn(2, 3, new, 5, generator=generator) for _ in range(2)]
        ours, theirs = roomy.update(*states), plain.update(*states)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert roomy.get_seq_length() == plain.get_seq_length()
    assert roomy.get_seq_length() == 13


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_stop_checks_every_few_steps_as_on_a_gpu_keep_the_outputs(tiny_models, arch, monkeypatch):
    """On a GPU the loop looks at the stop condition every 8 steps: rows that finished meanwhile write
    padding, the texts stay the same and at most 7 steps are spent after the last EOS."""
    loaded = _perturbed(tiny_models[arch], "lora")
    outcome = {}
    for every in (1, 8):
        monkeypatch.setattr(generation, "STOP_CHECK_EVERY", {"cpu": every})
        handle, calls = _stop_some_rows_early(loaded)
        texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES,
                                DecodingSettings(max_new_tokens=30, greedy_loop="ours"), CPU, show_progress=False)
        handle.remove()
        outcome[every] = texts, stats["new_tokens"], len(calls)
    assert outcome[8][:2] == outcome[1][:2]
    assert (outcome[1][2], outcome[8][2]) == (7, 8)  # the 7th step finished every row; the check came at the 8th


def test_greedy_loop_auto_is_ours_on_a_cpu_and_settings_are_checked(tiny_models):
    loaded = _perturbed(tiny_models["llama"], "lora")
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                        DecodingSettings(max_new_tokens=2), CPU, show_progress=False)
    assert stats["decoding_loop"] == "peft-nlg greedy"
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                        DecodingSettings(search="beam", max_new_tokens=2), CPU, show_progress=False)
    assert stats["decoding_loop"] == "peft-nlg beam (one prefill per prompt)"
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                        DecodingSettings(search="sample", max_new_tokens=2), CPU, show_progress=False)
    assert stats["decoding_loop"] == "transformers"  # sampling keeps transformers' loop
    with pytest.raises(ValueError, match="greedy_loop must be"):
        generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                 DecodingSettings(greedy_loop="fast"), CPU, show_progress=False)


def _plain_linears(model) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if type(module) is torch.nn.Linear and module.weight.is_contiguous()]


@pytest.mark.skipif(not generation.onednn_packs_bf16(), reason="no oneDNN bf16 packing on this torch or CPU")
@pytest.mark.parametrize("method", ["none", "lora", "prefix_tuning"])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_packed_linear_weights_give_the_same_outputs_in_bf16(tiny_models, method, search, monkeypatch):
    loaded = _perturbed(tiny_models["llama"], method)
    loaded.model.to(torch.bfloat16)
    linears = _plain_linears(loaded.model)
    settings = DecodingSettings(search=search, max_new_tokens=10)

    def run():
        return generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES, settings, CPU, torch.bfloat16,
                        show_progress=False)

    packed_texts, packed_stats = run()
    # every layer's projections and the head (an adapter's own matrices too): more than one per decoder layer
    assert packed_stats["linear_weights"] == f"oneDNN packed ({len(linears)} layers)"
    assert len(linears) > loaded.model.config.num_hidden_layers
    assert not any("forward" in vars(layer) for layer in linears)  # their own forwards are back afterwards
    with generation.packed_linear_weights(loaded.model, rows=8) as packed, torch.no_grad():  # as in generation
        assert packed == len(linears)
        for layer in linears:
            for shape in ((5, 1, layer.in_features), (3, layer.in_features)):
                hidden = torch.randn(*shape, dtype=torch.bfloat16)
                # products this small (16 to 64 wide) may differ in the last bit, as torch's matrix product runs
                # other kernels for them; SmolLM2's (576 wide and up) came out bit-identical
                torch.testing.assert_close(layer(hidden), torch.nn.functional.linear(hidden, layer.weight, layer.bias))
        # an input in another dtype takes F.linear, as it would without the packing (autocast would cast it)
        hidden = torch.randn(2, linears[0].in_features)
        with pytest.raises(RuntimeError, match="dtype"):
            linears[0](hidden)

    @contextlib.contextmanager
    def as_loaded(model, rows):
        yield 0

    monkeypatch.setattr(generation, "packed_linear_weights", as_loaded)
    texts, stats = run()
    assert stats["linear_weights"] == "as loaded" and texts == packed_texts


def test_linear_weights_are_not_packed_where_onednn_cannot_pack_bf16(tiny_models, monkeypatch):
    """An AVX2-only CPU has no oneDNN bf16 packing (the reorder raised there): bf16 generation keeps the layers."""
    loaded = _perturbed(tiny_models["llama"], "none")
    loaded.model.to(torch.bfloat16)
    monkeypatch.setattr(generation, "onednn_packs_bf16", lambda: False)
    texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:2],
                            DecodingSettings(max_new_tokens=3), CPU, torch.bfloat16, show_progress=False)
    assert stats["linear_weights"] == "as loaded" and len(texts) == 2


def test_linear_weights_are_not_packed_in_fp32(tiny_models):
    loaded = _perturbed(tiny_models["llama"], "none")
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                        DecodingSettings(max_new_tokens=2), CPU, show_progress=False)
    assert stats["linear_weights"] == "as loaded"


class _AttentionModule(torch.nn.Module):  # what transformers' attention functions read from their module
    num_key_value_groups, is_causal, training = 3, True, False


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_room_products_attention_is_sdpa_on_the_written_positions(mask_kind):
    """A decoding step's attention over a layer's whole room (positions past the written ones masked, whatever
    they hold) is SDPA's over the written positions alone, grouped-query heads and left padding included; a
    prefill (several query positions) is SDPA's own call."""
    generator = torch.Generator().manual_seed(0)
    rows, kv_heads, dim, written, room = 4, 2, 16, 9, 14
    query = torch.randn(rows, kv_heads * 3, 1, dim, generator=generator)
    keys, values = (torch.randn(rows, kv_heads, room, dim, generator=generator) for _ in range(2))
    keys[..., written:, :], values[..., written:, :] = 1e4, -1e4  # unwritten: would dominate if not masked
    padding = torch.tensor([0, 3, 1, 0])  # left padding per row
    positions = torch.arange(room)
    real = (positions >= padding[:, None]) & (positions < written)
    mask = real[:, None, None, :]
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _AttentionModule()
    ours, _ = generation.room_products_attention(module, query, keys, values, mask, scaling=0.3)
    expected, _ = generation.sdpa_attention_forward(module, query, keys[..., :written, :], values[..., :written, :],
                                                    mask[..., :written], scaling=0.3)
    assert ours.shape == expected.shape == (rows, 1, kv_heads * 3, dim)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() < 100  # nothing of the unwritten positions' ±1e4 came through
    prefill_query = torch.randn(rows, kv_heads * 3, 5, dim, generator=generator)
    prefill_mask = torch.ones(rows, 1, 5, written, dtype=torch.bool).tril(written - 5)
    args = (module, prefill_query, keys[..., :written, :], values[..., :written, :], prefill_mask)
    assert torch.equal(generation.room_products_attention(*args)[0], generation.sdpa_attention_forward(*args)[0])


def test_roomy_layer_with_the_whole_room_reports_and_grows_the_room_for_the_mask():
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(2, 3, 4, 5, generator=generator) for _ in range(2)]
    roomy = generation.RoomyLayer.after(*first, room=2, whole_room=True)
    assert roomy.get_mask_sizes(1) == (6, 0) and roomy.keys.shape[-2] == 6 and roomy.keys.is_contiguous()
    assert torch.equal(roomy.keys[..., :4, :], first[0]) and not roomy.keys[..., 4:, :].any()  # zeros after
    for step in range(3):  # the third step finds the room full: the mask's size call makes more first
        kv_length, _ = roomy.get_mask_sizes(1)
        keys, _ = roomy.update(*[torch.randn(2, 3, 1, 5, generator=generator) for _ in range(2)])
        assert keys.shape[-2] == kv_length >= roomy.get_seq_length() == 5 + step


def test_rows_kept_in_place_fill_finished_rows_places_from_the_end():
    unfinished = torch.tensor([True, False, True, False, True, True, False, True])
    assert generation.rows_kept_in_place(unfinished).tolist() == [0, 5, 2, 7, 4]
    assert generation.rows_kept_in_place(torch.tensor([True, True, False])).tolist() == [0, 1]
    assert generation.rows_kept_in_place(torch.tensor([False, True])).tolist() == [1]
    assert generation.rows_kept_in_place(torch.tensor([False, False])).tolist() == []


@pytest.mark.parametrize("whole_room", [True, False])
def test_a_row_drop_in_place_moves_only_the_rows_it_must_and_keeps_what_index_select_keeps(whole_room):
    """Dropping finished rows in the order rows_kept_in_place gives copies only the rows that fill their places,
    in the rooms' own buffers (no new one from the pool); the cache then holds what index_select keeps, and
    grows and takes new positions as before. Any other order (a beam search's) still takes new buffers."""
    generator = torch.Generator().manual_seed(0)
    pool = generation.RoomPool(positions=8)
    keys, values = (torch.randn(5, 2, 4, 3, generator=generator) for _ in range(2))
    roomy = generation.RoomyLayer.after(keys, values, room=2, whole_room=whole_room, pool=pool)
    buffers = {roomy._key_room.untyped_storage().data_ptr(), roomy._value_room.untyped_storage().data_ptr()}
    keep = generation.rows_kept_in_place(torch.tensor([False, True, True, False, True]))
    assert keep.tolist() == [4, 1, 2]
    roomy.reorder_cache(keep)
    assert {roomy._key_room.untyped_storage().data_ptr(), roomy._value_room.untyped_storage().data_ptr()} == buffers
    assert torch.equal(roomy.keys[..., :4, :], keys[keep]) and torch.equal(roomy.values[..., :4, :], values[keep])
    assert roomy.keys.shape[0] == 3 and not roomy.keys[..., 4:, :].any()
    new_keys, new_values = (torch.randn(3, 2, 3, 3, generator=generator) for _ in range(2))
    roomy.update(new_keys, new_values)  # past the room: it grows, from the rows kept
    assert torch.equal(roomy.keys[..., :7, :], torch.cat([keys[keep], new_keys], dim=2))
    assert torch.equal(roomy.values[..., :7, :], torch.cat([values[keep], new_values], dim=2))
    before = roomy._key_room.untyped_storage().data_ptr()
    roomy.reorder_cache(torch.tensor([2, 0]))  # in place, row 2 would overwrite row 0 before it is read: new buffers
    assert roomy._key_room.untyped_storage().data_ptr() != before
    assert torch.equal(roomy.keys[..., :7, :], torch.cat([keys[keep], new_keys], dim=2)[[2, 0]])


@pytest.mark.parametrize("whole_room", [True, False])
def test_a_reorder_within_each_prompts_beams_copies_only_the_moved_rows_new_positions(whole_room):
    """Rooms holding each prompt once per beam: a beam search's reorder (every beam takes a beam of its own
    prompt) keeps what index_select keeps, in the rooms' own buffers, without writing any prompt position (a
    marked prompt row is not copied onto its child); a reorder across prompts falls back to copying whole rows."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(2, 2, 4, 3, generator=generator) for _ in range(2)]  # 2 prompts, 4 positions
    roomy = generation.RoomyLayer.after(*prompts, room=3, whole_room=whole_room,
                                        pool=generation.RoomPool(positions=7), copies=3)
    plain = generation.DynamicLayer()
    plain.update(*(states.repeat_interleave(3, dim=0) for states in prompts))
    assert torch.equal(roomy.keys[..., :4, :], plain.keys) and roomy.keys.shape[0] == 6
    for _ in range(2):
        new = [torch.randn(6, 2, 1, 3, generator=generator) for _ in range(2)]
        roomy.update(*new)
        plain.update(*new)
    buffers = [room.untyped_storage().data_ptr() for room in (roomy._key_room, roomy._value_room)]
    marked = roomy._key_room[1, ..., :4, :].clone()
    roomy._key_room[1, ..., :4, :] = 99.0  # prompt 0's beam 1: its prompt positions, which no reorder may copy
    within = torch.tensor([0, 1, 1, 5, 3, 3])
    roomy.reorder_cache(within)
    plain.reorder_cache(within)
    assert [room.untyped_storage().data_ptr() for room in (roomy._key_room, roomy._value_room)] == buffers
    assert torch.equal(roomy._key_room[2, ..., :4, :], marked) and (roomy._key_room[1, ..., :4, :] == 99).all()
    roomy._key_room[1, ..., :4, :] = marked
    assert torch.equal(roomy.keys[..., :6, :], plain.keys) and torch.equal(roomy.values[..., :6, :], plain.values)
    across = torch.tensor([3, 4, 5, 0, 1, 2])
    roomy.reorder_cache(across)
    plain.reorder_cache(across)
    assert torch.equal(roomy.keys[..., :6, :], plain.keys) and torch.equal(roomy.values[..., :6, :], plain.values)
    assert roomy.copies == 1  # rows of two prompts' beams mixed: never again taken as copies


def test_a_cross_attention_of_copies_is_not_copied_by_a_reorder_within_its_runs():
    """A layer whose rows are runs of copies (each prompt's encoder output once per beam) keeps its tensors
    through a beam search's reorder (each beam takes a beam of its own prompt), holding what index_select holds;
    a reorder across runs, or a write, makes it an ordinary layer again. Runs are found only where rows are equal."""
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(2, 2, 5, 3, generator=generator).repeat_interleave(3, dim=0) for _ in range(2))
    assert generation.runs_of_copies(keys, 3) and not generation.runs_of_copies(keys, 2)
    different = keys.clone()
    different[4, 0, 0, 0] += 1.0
    assert not generation.runs_of_copies(different, 3) and not generation.runs_of_copies(keys, 4)
    layer = generation.DynamicLayer()
    layer.update(keys, values)
    runs, plain = generation.CopiesLayer.of(layer, 3), generation.DynamicLayer()
    plain.update(keys, values)
    for beam_idx, kept in ((torch.tensor([2, 0, 0, 4, 4, 3]), True), (torch.tensor([3, 4, 5, 0, 1, 2]), False)):
        held = runs.keys
        runs.reorder_cache(beam_idx)
        plain.reorder_cache(beam_idx)
        assert (runs.keys is held) == kept and runs.copies == (3 if kept else 1)
        assert torch.equal(runs.keys, plain.keys) and torch.equal(runs.values, plain.values)
    again = generation.CopiesLayer.of(layer, 3)
    again.update(*(torch.randn(6, 2, 1, 3, generator=generator) for _ in range(2)))
    assert again.copies == 1 and again.keys.shape[-2] == 6


@pytest.mark.parametrize("whole_room", [True, False])
def test_a_caches_rooms_pass_their_buffers_on_and_keep_what_concatenation_keeps(whole_room, monkeypatch):
    """Two layers sharing a pool grow their rooms several times and drop a row: the four buffers they started with
    and one more are all they use; what they hold is what concatenation holds, rows dropped as index_select drops
    them, and the room not yet written is zeros though the buffers held other layers' values before."""
    monkeypatch.setattr(generation, "ROOM_STEP", 2)
    generator = torch.Generator().manual_seed(0)
    pool = generation.RoomPool(positions=12)  # each buffer holds a layer's keys or values at their longest
    firsts = [[torch.randn(3, 2, 4, 5, generator=generator) for _ in range(2)] for _ in range(2)]
    roomy = [generation.RoomyLayer.after(*first, room=1, whole_room=whole_room, pool=pool) for first in firsts]
    plain = [generation.DynamicLayer() for _ in firsts]
    for layer, first in zip(plain, firsts, strict=True):
        layer.update(*first)
    buffers = set()

    def check(rows: int) -> None:
        for ours, theirs in zip(roomy, plain, strict=True):
            length = theirs.get_seq_length()
            assert ours.get_seq_length() == length and ours.keys.shape[0] == rows
            for mine, expected in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert torch.equal(mine[..., :length, :], expected)
                assert not mine[..., length:, :].any()  # the room not yet written (whole room only)
            buffers.update(room.untyped_storage().data_ptr() for room in (ours._key_room, ours._value_room))

    for step in range(8):
        if step == 5:  # the second row finished: every layer keeps rows 2 and 0
            keep = torch.tensor([2, 0])
            for ours, theirs in zip(roomy, plain, strict=True):
                ours.reorder_cache(keep)
                theirs.keys, theirs.values = theirs.keys[keep], theirs.values[keep]
        rows = 3 if step < 5 else 2
        roomy[0].get_mask_sizes(1)
        for ours, theirs in zip(roomy, plain, strict=True):
            states = [torch.randn(rows, 2, 1, 5, generator=generator) for _ in range(2)]
            ours.update(*states)
            theirs.update(*states)
        check(rows)
    assert roomy[0].get_seq_length() == 12 and len(buffers) == 5
    pool.give_back(torch.zeros(3, 2, 12, 5))  # a tensor the pool did not make is never handed on
    assert pool.spare is None or pool.spare.untyped_storage().data_ptr() in buffers


@pytest.mark.parametrize("method", ["none", "lora", "prefix_tuning", "prompt_tuning"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoding_by_room_products_writes_the_tokens_of_sdpa(tiny_models, arch, method, monkeypatch):
    """In fp32 our greedy loop attending by room products writes SDPA's tokens, on every architecture, rows
    stopping early included; the model attends as loaded again afterwards; auto picks it on a CPU for batches of
    ROOM_PRODUCTS_MIN_ROWS rows or more."""
    loaded = _perturbed(tiny_models[arch], method)
    implementation = loaded.model.config._attn_implementation
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES, DecodingSettings(max_new_tokens=2),
                        CPU, show_progress=False)
    assert stats["decode_attention"] == "as loaded"  # auto: too few rows
    monkeypatch.setattr(generation, "ROOM_PRODUCTS_MIN_ROWS", len(SOURCES))
    results = {}
    for attention in ("sdpa", "products", "auto"):
        handle, calls = _stop_some_rows_early(loaded)
        texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES,
                                DecodingSettings(max_new_tokens=12, decode_attention=attention), CPU,
                                show_progress=False)
        handle.remove()
        results[attention] = texts, stats["new_tokens"], len(calls), stats["decode_attention"]
        assert loaded.model.config._attn_implementation == implementation
    assert results["products"][:3] == results["sdpa"][:3] == results["auto"][:3]
    used = [results[name][3] for name in ("sdpa", "products", "auto")]
    assert used == ["as loaded", "room products", "room products"]
    assert sum(map(len, results["products"][0])) > 0
    with pytest.raises(ValueError, match="decode_attention must be"):
        generate(loaded.model, loaded.tokenizer, loaded.prompter, SOURCES[:1],
                 DecodingSettings(decode_attention="flash"), CPU, show_progress=False)


def test_cpu_generation_batches_are_sized_by_the_key_value_cache_they_hold(tiny_models):
    """Left to the model (batch_tokens 0, the CPU default), a batch holds as many tokens as CACHE_BYTES of keys
    and values: 65,536 tokens (the cap) for the embedded model's architecture in bf16, fewer for larger models
    and in fp32; the budget shapes the batches."""
    from transformers import AutoConfig, LlamaConfig

    from peft_nlg.config import RunConfig

    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert generation.cache_token_budget(smollm2, torch.bfloat16) == 65536  # 23,040 bytes a token: capped
    assert generation.cache_token_budget(smollm2, torch.float32) == int(1.5 * 2**30 // 46080)
    larger = LlamaConfig(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, num_key_value_heads=32)
    assert generation.cache_token_budget(larger, torch.bfloat16) == 8192
    sizes = RunConfig(task="dialogue", method="none").resolved_sizes(on_gpu=False)
    assert (sizes["gen_batch_tokens"], sizes["gen_max_batch_size"]) == (0, 256)
    loaded = _perturbed(tiny_models["t5"], "none")
    config = AutoConfig.from_pretrained(tiny_models["t5"])
    budget = generation.cache_token_budget(config, torch.float32)
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES,
                        DecodingSettings(max_new_tokens=2, batch_tokens=0), CPU, show_progress=False)
    assert stats["batch_tokens"] == budget and stats["batches"] == 1
    _, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES,
                        DecodingSettings(max_new_tokens=2, batch_tokens=40), CPU, show_progress=False)
    assert stats["batch_tokens"] == 40 and stats["batches"] > 1


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_batchs_cache_rooms_take_one_buffer_each_and_one_more_virtual_tokens_counted(tiny_models, arch, method,
                                                                                        monkeypatch):
    """A batch's cache rooms, grown ROOM_STEP positions at a time, come from one buffer per layer's keys and
    values and one more, each sized for the prompt, the virtual tokens a prompt-learning method puts before it
    and every new token. A pool that left the virtual tokens out grew the rooms one position a step at the end,
    each growth a new buffer held to the end of the batch (prefix tuning's 256 rows of dialogue on the real
    model: over 24 GB)."""
    monkeypatch.setattr(generation, "ROOM_STEP", 2)
    pools = []

    class RecordedPool(generation.RoomPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(generation, "RoomPool", RecordedPool)
    loaded = _perturbed(tiny_models[arch], method)
    settings = DecodingSettings(max_new_tokens=12, greedy_loop="ours", decode_attention="products")
    texts, stats = generate(loaded.model, loaded.tokenizer, loaded.prompter, MANY_SOURCES, settings, CPU,
                            show_progress=False)
    model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    decoder = model.get_decoder()
    layers = len(getattr(decoder, "layers", None) or decoder.block)  # T5 calls them blocks
    assert stats["batches"] == len(pools) == 1 and stats["new_tokens"] > 0
    assert stats["decode_attention"] == "room products"  # the whole room attended: it grows ROOM_STEP at a time
    allocated = len(pools[0]._ours)
    assert allocated == 2 * layers + 1
