"""Batched generation: prompts sorted by length, padded on the family's side; greedy, beam search or sampling."""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList, MinNewTokensLengthLogitsProcessor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import ModelOutput

from peft_nlg import cpu_kernels
from peft_nlg.batching import collate, token_budget_batches
from peft_nlg.formatting import Prompter
from peft_nlg.methods import SharedBeginning, shared_beginning
from peft_nlg.runtime import attention_kernel_names, attention_kernels, synchronize


@dataclass(frozen=True)
class DecodingSettings:
    search: str = "greedy"
    num_beams: int = 4
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    batch_tokens: int = 16384  # 0: as many as a key/value cache of CACHE_BYTES holds (cache_token_budget)
    max_batch_size: int = 64
    no_repeat_ngram: int = 0
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0        # sampling only: nucleus size
    seed: int = 0             # sampling only: the same seed gives the same outputs on the same machine
    cudnn_attention: bool = False  # see runtime.attention_kernels: each decode step is a new shape
    greedy_loop: str = "auto"  # auto: ours (greedy_decoding) on a CPU, transformers' elsewhere; ours; transformers
    # decoding steps' attention where our loop runs on a CPU: auto: room_kernel_attention in bf16 where the
    # kernel runs, else room_products_attention in batches of at least ROOM_PRODUCTS_MIN_ROWS rows; kernel;
    # products; sdpa (the model's own)
    decode_attention: str = "auto"

    def generate_kwargs(self) -> dict:
        lengths = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens or None}
        if self.search == "greedy":
            return {"do_sample": False, "num_beams": 1, **lengths}
        if self.search == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True, **lengths}
        if self.search == "sample":
            return {"do_sample": True, "num_beams": 1, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": 0, **lengths}
        raise ValueError(f"search must be greedy, beam or sample, not '{self.search}'")

    def describe(self) -> str:
        """A short name for tables: 'greedy', 'beam 4', 'sample T0.7 p0.9'."""
        return {"beam": f"beam {self.num_beams}",
                "sample": f"sample T{self.temperature:g} p{self.top_p:g}"}.get(self.search, self.search)


class NoRepeatInOutput(LogitsProcessor):
    """Never repeat an n-gram within one output.

    Unlike transformers' ``no_repeat_ngram_size``, only the generated tokens count: a decoder-only model's
    prompt (the conversation, the chat template) may be echoed, and the check is a few tensor operations per
    step instead of a Python loop over every sequence.

    The scores change in place, and only at each n-gram's last token (-inf added where it would close the n-gram
    again, 0 elsewhere, so an n-gram seen twice needs no care): a vocabulary-wide mask of the hits, then a masked
    copy of the scores, cost 50 ms a step for 256 rows (a beam search of 64 dialogue prompts, 2-core CPU).
    """

    def __init__(self, n: int, prompt_width: int):
        self.n, self.prompt_width = n, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] < self.n:
            return scores
        windows = generated.unfold(1, self.n, 1)                        # every n-gram so far: [rows, k, n]
        current = generated[:, generated.shape[1] - self.n + 1:]        # the n-1 tokens just produced
        repeats = (windows[:, :, :-1] == current[:, None, :]).all(-1)   # n-grams that would be closed again
        penalty = torch.zeros(repeats.shape, dtype=scores.dtype, device=scores.device)
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(repeats)
        return scores.index_put_((rows, windows[:, :, -1]), penalty.masked_fill_(repeats, float("-inf")),
                                 accumulate=True)


class NeverEmit(LogitsProcessor):
    """Rule one token out (padding). transformers' ``suppress_tokens`` builds a vocabulary-wide mask and a
    copy of the scores at every step (2.3 ms of a 33 ms step for 64 rows on the 2-core CPU); this writes one
    column in place."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token] = float("-inf")
        return scores


ARGMAX_BLOCK = 1024


def first_argmax(scores: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``scores.argmax(-1)`` (the first maximum of each row), found in two passes.

    On the 2-core CPU a vocabulary-wide ``argmax`` reads about 1 G values/s, ten times slower than ``amax``;
    taking each block's maximum first and then the argmax inside the winning block gives the same index
    (ties go to the first block, then to the first position in it) in an eighth of the time for 64 rows of
    49,152 scores. Elsewhere (a GPU's argmax is one fast kernel) and for small vocabularies it is argmax.
    """
    block = block or ARGMAX_BLOCK
    vocab = scores.shape[1]
    if scores.device.type != "cpu" or vocab < 4 * block:
        return scores.argmax(-1)
    whole = vocab // block * block
    maxima = scores[:, :whole].unflatten(1, (-1, block)).amax(-1)
    if whole < vocab:
        maxima = torch.cat([maxima, scores[:, whole:].amax(-1, keepdim=True)], dim=1)
    start = maxima.argmax(-1) * block
    # the last block may be shorter: its window repeats the last index, after the real one, so never first
    window = (start[:, None] + torch.arange(block, device=scores.device)).clamp_(max=vocab - 1)
    return start + scores.gather(1, window).argmax(-1)


# steps between checks whether every row has finished: a check is a host sync on a GPU, free on a CPU; rows
# that finished write padding meanwhile, which the caller strips
STOP_CHECK_EVERY = {"cpu": 1}

# processors that only rule tokens out (set their scores to -inf): they give the same choice on the model's
# bf16 logits as on transformers' fp32 copy of them, so the greedy loop can skip that copy when only these run
_MASKING_ONLY = (NeverEmit, NoRepeatInOutput, MinNewTokensLengthLogitsProcessor)


# where the kernel cannot run, auto attends by room products in batches of at least this many rows: they were
# faster than SDPA in batches of 128 and 256 dialogue prompts (1.07-1.21x, 2-core AVX-512 CPU) and slower in one
# of 40 translation prompts (100-106 against 114-124 new tokens/s); between the two it is unmeasured. The kernel
# was faster than both at every size measured, from 1 row to 256 (2026-12-07, 38th session)
ROOM_PRODUCTS_MIN_ROWS = 128

# positions a whole-room cache layer grows by: each position of room costs every step's attention as much as a
# written one, and each growth copies the layer once (a copy costs about a step's attention over the layer;
# once in 16 steps, against on average 8 positions of unused room per step)
ROOM_STEP = 16


class RoomPool:
    """The buffers a cache's rooms live in, each big enough for one layer's keys or values at their longest
    (``positions``), handed on from layer to layer as rooms grow or lose rows.

    A room that grows or drops rows needs a new buffer, which the 30 layers' keys and values all need at the same
    step. Freshly allocated, each of those buffers is fresh memory the kernel has to fault in page by page: for
    256 rows, zeroing 22 MB took 25 ms per buffer (the page faults), against 1.4 ms for the copy that follows:
    2.6 of 47 s of op time in a 256-row batch (2-core AVX-512 EPYC, profiled). Here the first room that grows
    takes one new buffer and leaves its own behind for the next, so a batch allocates one buffer more, once.
    """

    def __init__(self, positions: int = 0):  # 0: as many as each room needs
        self.positions, self.spare = positions, None
        # the buffers this pool allocated, held so that no other tensor can take their address: only those are
        # passed on (the pool lives as long as its cache, one batch)
        self._ours: dict[int, torch.UntypedStorage] = {}

    def room(self, like: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
        """An uninitialised contiguous [rows, ..., positions, dim] tensor of ``like``'s dtype."""
        shape = (rows, *like.shape[1:-2], positions, like.shape[-1])
        needed = math.prod(shape)
        spare, self.spare = self.spare, None
        if spare is None or spare.numel() < needed or (spare.dtype, spare.device) != (like.dtype, like.device):
            spare = like.new_empty(max(needed, needed // positions * max(positions, self.positions)))
            self._ours[spare.data_ptr()] = spare.untyped_storage()
        return spare[:needed].view(shape)

    def give_back(self, room: torch.Tensor) -> None:
        """``room``'s buffer, if this pool allocated it, for the next room; ``room`` must not be used again."""
        storage = room.untyped_storage()
        if storage.data_ptr() in self._ours and (self.spare is None or storage.nbytes() > self.spare.nbytes):
            self.spare = room.new_empty(0).set_(storage)


class RoomyLayer(DynamicLayer):
    """A self-attention cache layer that writes each step's keys and values into room reserved after the prefill.

    transformers' ``DynamicLayer`` concatenates the whole cache with the new position at every step, copying
    it once per layer and step (0.8 ms per copy for 64 dialogue prompts on the 2-core CPU). Here a step writes
    one position; the layer hands attention a view of the filled part, whose rows are strided, which SDPA's
    kernels read as fast. Out of room it doubles.

    With ``whole_room`` it hands attention the whole room instead, one contiguous tensor, and reports the room's
    size for the attention mask, which then masks the positions not yet written like padding (they hold zeros):
    ``room_products_attention`` needs that to run its products in one call each.

    New rooms (to grow, or to keep fewer rows) come from ``pool``, shared by a cache's layers.

    ``copies``: each run of so many rows holds copies of one row in the first ``shared`` positions (a beam
    search's beams of one prompt), which a reorder within each run then leaves in place.
    """

    def __init__(self, key_room: torch.Tensor, value_room: torch.Tensor, length: int, pool: RoomPool,
                 whole_room: bool = False, copies: int = 1, shared: int = 0):
        super().__init__()
        self.device, self.is_initialized, self.length = key_room.device, True, length
        self._key_room, self._value_room, self.whole_room = key_room, value_room, whole_room
        self.pool, self.copies, self.shared = pool, copies, shared
        self._expose()

    @classmethod
    def after(cls, keys: torch.Tensor, values: torch.Tensor, room: int, whole_room: bool = False,
              pool: RoomPool | None = None, copies: int = 1) -> RoomyLayer:
        """The layer holding ``keys`` and ``values``, each row ``copies`` times over (each copy right after its
        row), with room for ``room`` more positions."""
        pool, length = pool or RoomPool(), keys.shape[-2]
        return cls(_with_room(keys, length, room, pool, copies), _with_room(values, length, room, pool, copies),
                   length, pool, whole_room, copies, length if copies > 1 else 0)

    def _expose(self) -> None:
        end = None if self.whole_room else self.length
        self.keys = self._key_room[..., :end, :]
        self.values = self._value_room[..., :end, :]

    def _make_room(self, new: int) -> None:
        if self.length + new > self._key_room.shape[-2]:
            # the whole room is attended over, so it grows a little at a time; a view only doubles
            room = max(ROOM_STEP, new) if self.whole_room else max(self.length, new)
            if self.pool.positions:  # no further than the pool's buffers hold (the most a batch writes) unless needed
                room = max(new, min(room, self.pool.positions - self.length))
            self._key_room = self._moved(self._key_room, _with_room(self._key_room, self.length, room, self.pool))
            self._value_room = self._moved(self._value_room,
                                           _with_room(self._value_room, self.length, room, self.pool))
            self._expose()

    def _moved(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        self.pool.give_back(old)
        return new

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.whole_room:
            return super().get_mask_sizes(query_length)
        self._make_room(query_length)  # the mask is made before the update, for the room the update will use
        return self._key_room.shape[-2], 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        self._make_room(new)
        self._key_room[..., self.length:self.length + new, :] = key_states
        self._value_room[..., self.length:self.length + new, :] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep (and order) the rows ``beam_idx``, room included.

        Where every row takes a row of its own run of ``copies`` (a beam search's step: each beam continues a beam
        of its own prompt), the runs' shared positions stay and only the moved rows' later positions are copied:
        in a beam search of 32 dialogue prompts (4 beams) on the 30-layer model, a step's reorder took 0.90 ms per
        layer's keys or values copying every row's whole cache, 0.19 ms here (the prompts are most of a cache).

        Where every row that changes place comes from beyond the first ``len(beam_idx)`` rows (finished rows'
        places filled from the end, as ``rows_kept_in_place`` orders them), only those rows are copied, into the
        rooms themselves, whose first rows then are the cache: no row is overwritten before it is read.
        """
        beam_idx = beam_idx.to(self._key_room.device)
        kept = len(beam_idx)
        moved = (beam_idx != torch.arange(kept, device=beam_idx.device)).nonzero().squeeze(1)
        if stays_within_runs(beam_idx, self.copies, self._key_room.shape[0]):
            parents = beam_idx[moved]  # read (as a copy) before any row is written
            for room in (self._key_room, self._value_room):
                room[moved, ..., self.shared:self.length, :] = room[parents, ..., self.shared:self.length, :]
            return
        self.copies, self.shared = 1, 0  # the runs are mixed or cut: no longer copies
        if kept <= self._key_room.shape[0] and bool((beam_idx[moved] >= kept).all()):
            for room in (self._key_room, self._value_room):
                room[moved] = room[beam_idx[moved]]
            self._key_room, self._value_room = self._key_room[:kept], self._value_room[:kept]
        else:
            self._key_room = self._moved(self._key_room, self._rows(self._key_room, beam_idx))
            self._value_room = self._moved(self._value_room, self._rows(self._value_room, beam_idx))
        self._expose()

    def _rows(self, room: torch.Tensor, rows: torch.LongTensor) -> torch.Tensor:
        return torch.index_select(room, 0, rows, out=self.pool.room(room, len(rows), room.shape[-2]))


def stays_within_runs(beam_idx: torch.LongTensor, copies: int, rows: int) -> bool:
    """Whether ``beam_idx`` gives each of ``rows`` rows a row of its own run of ``copies`` (1: no runs)."""
    place = torch.arange(len(beam_idx), device=beam_idx.device)
    return copies > 1 and len(beam_idx) == rows and torch.equal(beam_idx // copies, place // copies)


class CopiesLayer(DynamicLayer):
    """A cache layer whose rows come in runs of ``copies`` equal rows and are not written after the prefill: an
    encoder-decoder's cross-attention in a beam search, each prompt's encoder output once per beam. A beam
    search's reorder keeps every row within its run, so it changes nothing and copies nothing: in a beam search
    of a t5-small-sized model (random weights, 32 prompts of 300 tokens, 4 beams, 48 new tokens, 2-core CPU)
    the reorders' copies were 37% of the op time, nearly all of it (6.2 of 6.3 s) the cross-attention's."""

    @classmethod
    def of(cls, layer: DynamicLayer, copies: int) -> CopiesLayer:
        runs = cls()
        runs.__dict__.update(vars(layer))
        runs.copies = copies
        return runs

    def update(self, *args, **kwargs):
        self.copies = 1  # written again: no longer known to be copies
        return super().update(*args, **kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not stays_within_runs(beam_idx.to(self.keys.device), self.copies, self.keys.shape[0]):
            self.copies = 1
            super().reorder_cache(beam_idx)


def runs_of_copies(keys: torch.Tensor, copies: int) -> bool:
    """Whether the rows of ``keys`` come in runs of ``copies`` equal rows."""
    if copies < 2 or keys.shape[0] % copies:
        return False
    runs = keys.unflatten(0, (-1, copies))
    return torch.equal(runs, runs[:, :1].expand_as(runs))


def _with_room(states: torch.Tensor, length: int, room: int, pool: RoomPool, copies: int = 1) -> torch.Tensor:
    """The first ``length`` positions of ``states`` [rows, ..., positions, dim] in a buffer ``room`` positions
    longer, zeros after them (a masked position must hold nothing that could turn into NaN in attention); each
    row ``copies`` times, one after another."""
    buffer = pool.room(states, states.shape[0] * copies, length + room)
    buffer.unflatten(0, (-1, copies))[..., :length, :] = states[:, None, ..., :length, :]
    buffer[..., length:, :] = 0
    return buffer


def reserve_cache_room(cache, room: int, pool: RoomPool, whole_room: bool = False) -> None:
    """Give every plain dynamic self-attention layer of ``cache`` room for ``room`` more positions, rooms from
    ``pool`` (one for all layers).

    Cross-attention caches (an encoder-decoder's) never grow and stay as they are; any other cache type
    (static, sliding-window) is left alone.
    """
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, DynamicCache):
        return
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[index] = RoomyLayer.after(layer.keys, layer.values, room, whole_room, pool)


@dataclass
class DecodingRooms:
    """How a decoding loop's cache keeps room for the new tokens (``RoomyLayer``): ``room`` positions reserved
    after the prefill, rooms from ``pool``, attended over whole or not (``attends_over_whole_room``)."""
    new_tokens: int
    room: int
    pool: RoomPool
    whole_room: bool

    @classmethod
    def for_batch(cls, model, input_ids: torch.LongTensor, generation_config) -> DecodingRooms:
        whole_room = attends_over_whole_room(model)
        new_tokens = generation_config.max_length - input_ids.shape[1]
        # room for every new token, once; attended over whole, room grows as it fills (a task's limit, e.g. 128
        # new tokens, is often several times what a batch writes)
        room = min(new_tokens, ROOM_STEP) if whole_room else new_tokens
        # rooms at their longest: a prompt-learning method's virtual tokens (cached before the prompt), the prompt
        # and every new token; a pool short of the virtual tokens grew the rooms one position a step at the end,
        # each time into a new buffer (over 24 GB for 256 rows of prefix tuning on the 30-layer model)
        beginning = shared_beginning(model)
        pool = RoomPool(generation_config.max_length + (beginning.length if beginning else 0))
        return cls(new_tokens, room, pool, whole_room)

    def reserve_after(self, cache) -> None:
        """Room in ``cache``, filled by a prefill of its own (see ``reserve_cache_room``), the rooms at their
        longest sized from what it cached, virtual tokens included (an encoder-decoder's prefix)."""
        if cache is not None:
            self.pool.positions = cache.get_seq_length() + self.new_tokens
        reserve_cache_room(cache, self.room, self.pool, self.whole_room)


def _per_row_inputs(model_kwargs: dict) -> set[str]:
    return {key for key, value in model_kwargs.items() if isinstance(value, torch.Tensor)}


def _rows_can_be_prefilled_apart(model, model_kwargs: dict, shared: SharedBeginning | None = None) -> bool:
    """Whether a prefill's rows can be computed in separate calls and joined: a decoder-only model, an empty
    dynamic cache, per-row inputs no more than token ids, attention mask and position ids (which can be
    sliced), and input preparation of the model's own, or replaced (peft's prompt-learning methods add virtual
    tokens there) by a method that gave its virtual tokens as ``shared``, which the caller puts first."""
    cache = model_kwargs.get("cache")
    return not (model.config.is_encoder_decoder
                or ("prepare_inputs_for_generation" in vars(model) and shared is None)
                or _per_row_inputs(model_kwargs) - {"attention_mask", "position_ids"}
                or type(cache) is not DynamicCache or cache.get_seq_length() != 0)


@contextmanager
def own_input_preparation(model):
    """Within: ``model`` prepares its inputs by its class's own method, not by a replacement (peft's)."""
    replaced = vars(model).pop("prepare_inputs_for_generation", None)
    try:
        yield
    finally:
        if replaced is not None:
            model.prepare_inputs_for_generation = replaced


# rows per prefill call when a left-padded batch is prefilled in groups of similar length (prefill_by_length)
PREFILL_ROWS = 8


def shared_prefix_length(input_ids: torch.LongTensor, lengths: torch.LongTensor) -> int:
    """How many leading real tokens every row of a left-padded batch has in common (a task's instruction and
    chat template), leaving each row at least one token of its own, whose logits start the decoding."""
    width, shortest = input_ids.shape[1], int(lengths.min())
    columns = (width - lengths)[:, None] + torch.arange(shortest - 1, device=input_ids.device)
    leading = input_ids.gather(1, columns)
    return int((leading == leading[:1]).all(0).cumprod(0).sum())


def prefill_by_length(model, input_ids: torch.LongTensor, generation_config, model_kwargs: dict, room: int,
                      pool: RoomPool, whole_room: bool = False):
    """The prefill of a left-padded decoder-only batch, run in groups of rows of similar length, with what every
    row begins with computed once.

    One prefill call computes every padding position of the batch: for 64 dialogue prompts of 24 to 145 tokens,
    9,280 positions for 3,935 real ones, and on the 2-core CPU the prefill was 40% of a 30-layer model's
    greedy decoding. Each group of ``PREFILL_ROWS`` rows drops the padding columns it does not need; the
    groups' caches are then laid side by side, right-aligned, in one cache with ``room`` positions to spare
    (rooms from ``pool``), so the decoding steps still run on the whole batch. The columns a group dropped stay
    zero and masked.

    What every row begins with is computed once, given to each group as a cache it continues from, and written
    into every row's place in the joined cache:
    - a prompt-learning method's virtual tokens (``methods.SharedBeginning``), the first columns of every row:
      peft's own prefill computes them once per row, over the whole padded batch (prompt tuning's and P-tuning's
      prefill of 256 dialogue prompts took 50-52 s, LoRA's 11 s);
    - every prompt of a task starts with the same system turn and instruction (31 of the 84 tokens of an average
      dialogue prompt in the benchmark's format): the same token ids and position ids in every row, so the same
      keys and values, just before each row's own tokens.

    Returns the prefill's outputs (logits of every row, the joined cache), or None where this does not apply:
    an encoder-decoder, inputs other than token ids, attention mask and position ids (which a group could not
    slice), padding not on the left, or input preparation replaced by a wrapper that did not say what it adds.
    """
    beginning = shared_beginning(model)
    mask, positions, cache = (model_kwargs.get(key) for key in ("attention_mask", "position_ids", "cache"))
    if not _rows_can_be_prefilled_apart(model, model_kwargs, beginning) or mask is None or positions is None \
            or input_ids.shape[0] <= PREFILL_ROWS:
        return None
    width = input_ids.shape[1]
    lengths = mask.sum(1)
    columns = torch.arange(width, device=mask.device)
    if not torch.equal(mask.bool(), columns[None, :] >= width - lengths[:, None]):
        return None  # not every row is one block of real tokens at the right end
    batch, virtual = input_ids.shape[0], beginning.length if beginning else 0
    positions = positions + virtual  # the prompt counts on after the virtual tokens, as in training

    def whole_batch(states: torch.Tensor, capacity: int) -> torch.Tensor:
        # zeros: a masked position must not hold what could turn into NaN in attention
        return pool.room(states, batch, capacity).zero_()

    def prefill_part(part: dict, known: list) -> list:
        """The prefill of ``part``'s tokens after ``known`` positions (each layer's keys and values, one row)
        that its attention mask covers too; by the model's own input preparation (the virtual tokens are known)."""
        rows = part["input_ids"].shape[0]
        part_cache = DynamicCache([(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                   for keys, values in known], config=model.config) if known \
            else DynamicCache(config=model.config)  # either copies into a buffer of its own
        with own_input_preparation(model):
            return model._prefill(part["input_ids"], generation_config,
                                  {**model_kwargs, "attention_mask": part["attention_mask"],
                                   "position_ids": part["position_ids"], "cache": part_cache})

    # what every row begins with: the virtual tokens, then the prompts' common tokens after them
    prefix_states = beginning.layers() if beginning else []
    shared = shared_prefix_length(input_ids, lengths)
    if shared:
        first = width - int(lengths[0])
        prefix = {"input_ids": input_ids[:1, first:first + shared], "position_ids": positions[:1, first:first + shared],
                  "attention_mask": mask.new_ones((1, virtual + shared))}
        prefix_states = [(layer.keys, layer.values) for layer in prefill_part(prefix, prefix_states)["cache"].layers]
    known = virtual + shared
    logits = rooms = outputs = None
    for rows in lengths.argsort(stable=True).split(PREFILL_ROWS):
        start = width - int(lengths[rows].max()) + shared  # the group's own columns, after the common beginning
        # a shorter row's common beginning falls inside the group's columns: masked there, it comes from the cache
        own_tokens = columns[None, start:] >= (width - lengths[rows] + shared)[:, None]
        group = {"input_ids": input_ids[rows, start:], "position_ids": positions[rows, start:],
                 "attention_mask": torch.cat([mask.new_ones((len(rows), known)), own_tokens.to(mask.dtype)], dim=1)}
        outputs = prefill_part(group, prefix_states)
        group_states = [(layer.keys[..., known:, :], layer.values[..., known:, :])
                        for layer in outputs["cache"].layers]
        if logits is None:
            logits = outputs.logits.new_empty((batch, *outputs.logits.shape[1:]))
            rooms = [[whole_batch(states, virtual + width + room) for states in layer] for layer in group_states]
        logits[rows] = outputs.logits
        for layer_rooms, layer_states in zip(rooms, group_states, strict=True):
            for states_room, states in zip(layer_rooms, layer_states, strict=True):
                states_room[rows, ..., virtual + start:virtual + width, :] = states
    # each row's virtual tokens first, then its common beginning just before its own tokens (over a shorter row's
    # group padding)
    if known:
        every_row = torch.arange(batch, device=mask.device)[:, None]
        prefix_columns = virtual + (width - lengths)[:, None] + torch.arange(shared, device=mask.device)
        for layer_rooms, layer_states in zip(rooms, prefix_states, strict=True):
            for states_room, states in zip(layer_rooms, layer_states, strict=True):
                states_room[..., :virtual, :] = states[..., :virtual, :]
                # indexing rows and columns around the heads' slice puts them first: [rows, columns, heads, dim]
                states_room[every_row, :, prefix_columns] = states[0, :, virtual:].transpose(0, 1)
    cache.layers = [RoomyLayer(key_room, value_room, virtual + width, pool, whole_room)
                    for key_room, value_room in rooms]
    outputs["logits"], outputs["cache"] = logits, cache
    return outputs


# the attention our decoding runs on a CPU (see room_products_attention), by the name transformers knows it by
ROOM_PRODUCTS = "peft_nlg_room_products"


def room_products_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """A decoding step's attention (one query position) as two batched matrix products, one call each for
    every row and head; several query positions (a prefill), or anything SDPA's path handles that plain
    products would not (dropout, soft-capping, sinks, a position bias), go to transformers' SDPA attention.

    torch's CPU flash-attention kernel runs a small product per row and key/value head: for 128 rows, 3 key/value
    heads and about 150 cached positions, 2.2-2.6 ms per layer and step on the 2-core AVX-512 CPU, where the same
    attention as two products over each layer's contiguous cache room (positions not yet written masked) took
    1.3-1.8 ms (micro-benchmark, 30 layers' caches in turn). The keys and values are then the whole room
    (``RoomyLayer`` with ``whole_room``), so each product reads them in place.

    Precision: the scores come out of the product in the compute dtype and are softmaxed in fp32, as
    transformers' eager attention does; SDPA keeps them in fp32. In fp32 nothing is rounded.
    """
    plain = (query.shape[2] == 1 and attention_mask is not None and not dropout
             and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias")))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    group = heads // kv_heads  # query heads per key/value head, next to each other (transformers' repeat_kv)
    scaling = dim ** -0.5 if scaling is None else scaling
    queries = (query * scaling).reshape(rows * kv_heads, group, dim)
    scores = torch.bmm(queries, key.reshape(rows * kv_heads, positions, dim).transpose(1, 2))
    if attention_mask.dtype == torch.bool:
        # added as 0 / -inf (exact in any dtype) rather than masked_fill'ed: a masked_fill broadcast over the heads
        # took 0.20 ms, the addition 0.06 (256 rows, 215 positions, 2-core CPU)
        attention_mask = attention_mask.new_zeros(attention_mask.shape, dtype=scores.dtype).masked_fill_(
            ~attention_mask, float("-inf"))
    scores = scores.view(rows, kv_heads, group, positions) + attention_mask  # in the wider of the two dtypes
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype).view(rows * kv_heads, group, positions)
    output = torch.bmm(weights, value.reshape(rows * kv_heads, positions, dim))
    return output.view(rows, 1, heads, dim), None


def _mask_for_room_products(*args, **kwargs):
    # always a mask: SDPA may drop it and attend everywhere when nothing is padding, but the room's unwritten
    # positions (RoomyLayer's whole_room) must be masked
    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    if kwargs.get("q_length") != 1 or mask is None or mask.dtype != torch.bool:
        return mask
    # a decoding step's mask as 0 / -inf in the compute dtype, once for every layer's room_products_attention
    # (made there from the boolean mask, 0.12-0.16 ms per layer and step for 256 rows on the 2-core CPU)
    return torch.zeros(mask.shape, dtype=kwargs.get("dtype", torch.float32), device=mask.device).masked_fill_(
        ~mask, float("-inf"))


AttentionInterface.register(ROOM_PRODUCTS, room_products_attention)
AttentionMaskInterface.register(ROOM_PRODUCTS, _mask_for_room_products)

# the attention our decoding runs on a CPU with AVX512-BF16 in bf16 (see room_kernel_attention)
ROOM_KERNEL = "peft_nlg_room_kernel"
KERNEL_DECLINED = [0]  # decoding steps' layers that room_kernel_attention passed to the products, ever


def room_kernel_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """A decoding step's attention by our CPU kernel (``cpu_kernels.decode_attention``): per row and key/value
    head, the scores of its query heads, their softmax and the weighted values in one pass over the cache room,
    reading each position's keys and values once and skipping masked ones. torch's two batched products read them
    at about a fifth of the memory's speed (oneDNN's overhead per small product) and SDPA's CPU kernel slower
    still. Precision as SDPA's CPU flash attention: fp32 scores and softmax, weights rounded to bf16, fp32 sums.
    What the kernel does not take (a prefill, fp32, soft-capping, ...) goes to ``room_products_attention``."""
    plain = (query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool
             and not dropout
             and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias")))
    if plain:
        rows, positions = query.shape[0], key.shape[2]
        keep = attention_mask.expand(rows, 1, 1, positions).reshape(rows, positions) \
            if attention_mask.shape[1:3] == (1, 1) else None
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        output = None if keep is None else cpu_kernels.decode_attention(query, key, value, keep, scale)
        if output is not None:
            return output, None
        KERNEL_DECLINED[0] += 1  # a decoding step's layer the kernel would not take: counted for the statistics
    return room_products_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   **kwargs)


def _mask_for_room_kernel(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False  # as for room products: the unwritten positions must be masked
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ROOM_KERNEL, room_kernel_attention)
AttentionMaskInterface.register(ROOM_KERNEL, _mask_for_room_kernel)

# how statistics name each decoding attention
ATTENTION_NAMES = {ROOM_KERNEL: "room kernel", ROOM_PRODUCTS: "room products", None: "as loaded"}


def attends_over_whole_room(model) -> bool:
    """Whether the model attends by a function that reads a cache layer's whole room (RoomyLayer's whole_room)."""
    return getattr(model.config, "_attn_implementation", None) in (ROOM_PRODUCTS, ROOM_KERNEL)


@contextmanager
def decoding_attention(model, implementation: str | None):
    """Within: the model attends with ``implementation`` (ROOM_KERNEL, ROOM_PRODUCTS) where asked, if it attends
    by SDPA and takes a registered attention function; afterwards, as before. Yields what it attends with (None:
    as loaded)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if implementation is None or previous != "sdpa":
        yield None
        return
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        yield None
        return
    try:
        yield implementation
    finally:
        model.set_attn_implementation(previous)


# finished rows leave the batch once at least this share of its rows (and at least one) has finished: a step's
# work grows with its rows (on the 2-core CPU about linearly), and a batch runs until its longest output ends, so
# rows that end early (trained dialogue models' replies: 13 to 44 of 64 new tokens on average; a third of
# SmolLM2-Instruct's dialogue replies) spend the rest of the batch's steps writing padding. A drop moves only the
# rows that fill finished rows' places (``rows_kept_in_place``), a few milliseconds, so it can come early and often.
DROP_FINISHED_SHARE = 1 / 32


def rows_kept_in_place(unfinished: torch.Tensor) -> torch.LongTensor:
    """The unfinished rows' indices, ordered to move the fewest: the ``k`` unfinished rows become rows 0..k-1,
    each unfinished row among the first ``k`` keeping its place, and those after them taking the places of the
    finished rows there, in order."""
    kept = int(unfinished.sum())
    keep = torch.arange(kept, device=unfinished.device)
    keep[(~unfinished[:kept]).nonzero().squeeze(1)] = unfinished[kept:].nonzero().squeeze(1) + kept
    return keep


def _keep_rows(value, keep: torch.LongTensor, rows: int):
    """``value`` (a model input) with only the batch rows ``keep``: caches, tensors whose first dimension is
    the batch (not ``cache_position``, one dimension), encoder outputs; anything else as it is."""
    if isinstance(value, Cache):  # an encoder-decoder's too: its self- and cross-attention caches
        value.reorder_cache(keep)
    elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
        return value.index_select(0, keep)
    elif isinstance(value, ModelOutput):
        for key, item in value.items():
            value[key] = _keep_rows(item, keep, rows)
    return value


def greedy_decoding(model, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
                    stopping_criteria, generation_config, **model_kwargs) -> torch.LongTensor:
    """Greedy decoding loop for ``model.generate(custom_generate=...)``: the same tokens as transformers' own.

    transformers prepares the inputs, the cache and, for peft's prompt-learning methods, the virtual tokens
    (peft installs its ``prepare_inputs_for_generation``); this loop only does the per-step work more cheaply
    on a CPU, where a 2-layer model's greedy step was a third argmax and logits copies: no fp32 copy of the
    logits unless a processor needs one, the two-pass argmax, and no stop check waiting on a GPU every step;
    and the cache: a prefill without most of the padding (``prefill_by_length``), and steps that write into
    room reserved once instead of copying the cache (``RoomyLayer``); and rows that finished leave the batch
    (``DROP_FINISHED_SHARE``), their ids kept as transformers returns them, padding after the end.
    """
    pad = generation_config._pad_token_tensor
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    keep_dtype = all(isinstance(p, _MASKING_ONLY) for p in logits_processor)
    check_every = STOP_CHECK_EVERY.get(input_ids.device.type, 8)
    is_encoder_decoder = model.config.is_encoder_decoder
    rooms = DecodingRooms.for_batch(model, input_ids, generation_config)
    outputs = prefill_by_length(model, input_ids, generation_config, model_kwargs, rooms.room, rooms.pool,
                                rooms.whole_room)
    if outputs is None:
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        rooms.reserve_after(outputs.get("cache"))
    steps = 0
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # each row's place in the whole batch
    whole = None  # the whole batch's ids, written as rows leave
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                 is_encoder_decoder=is_encoder_decoder)
        logits = outputs.logits[:, -1]
        logits = logits if keep_dtype else logits.to(dtype=torch.float32, copy=True)
        next_tokens = first_argmax(logits_processor(input_ids, logits))
        if pad is not None:  # finished rows write padding, as in transformers
            next_tokens = torch.where(unfinished, next_tokens, pad)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished &= ~stopping_criteria(input_ids, None)
        steps += 1
        if input_ids.shape[1] >= generation_config.max_length:
            break
        if steps % check_every == 0:
            left = int(unfinished.sum())
            if left == 0:
                break
            if pad is not None and len(rows) - left >= max(1.0, DROP_FINISHED_SHARE * len(rows)):
                if whole is None:  # the first drop: every row is still here
                    whole = input_ids.new_full((len(rows), generation_config.max_length), pad)
                done, keep = (~unfinished).nonzero().squeeze(1), rows_kept_in_place(unfinished)
                whole[rows[done], :input_ids.shape[1]] = input_ids[done]
                model_kwargs = {key: _keep_rows(value, keep, len(rows)) for key, value in model_kwargs.items()}
                input_ids, unfinished, rows = input_ids[keep], unfinished[keep], rows[keep]
        model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        outputs = model(**model_inputs, return_dict=True)
    if whole is None:
        return input_ids
    whole[rows, :input_ids.shape[1]] = input_ids
    return whole[:, :input_ids.shape[1]]


def beam_search_with_shared_prefill(model, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
                                    stopping_criteria, generation_config, synced_gpus: bool = False,
                                    **model_kwargs) -> torch.LongTensor:
    """transformers' beam search (``model.generate(custom_generate=...)``), each prompt prefilled once for all
    its beams.

    transformers copies every prompt once per beam before the prefill, so a decoder-only model computes each
    prompt ``num_beams`` times; with summarization's long prompts and short outputs that prefill is most of a
    beam search. Here the prefill runs on one copy of each prompt and its cache and logits are copied to the
    beams afterwards; the search itself is transformers' own. Where it does not apply (see
    ``_prefill_once_per_prompt``) the prefill is transformers'.

    The cache then lives in rooms (``RoomyLayer``), as in ``greedy_decoding``: a step writes one position instead
    of concatenating each layer's cache with it (the concatenations were 13% of a beam search's op time, 32
    dialogue prompts on the 30-layer model). Every step reorders the cache (each beam takes its parent's rows);
    with one prefill per prompt, the prompt's positions stay where they are (``RoomyLayer.reorder_cache``).
    """
    prefill_every_row = model._prefill
    previous = vars(model).get("_prefill")  # normally none: the class's method
    rooms = DecodingRooms.for_batch(model, input_ids, generation_config)

    def prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True):
        outputs = _prefill_once_per_prompt(model, prefill_every_row, input_ids, generation_config, model_kwargs,
                                           is_first_iteration, rooms)
        if outputs is None:
            outputs = prefill_every_row(input_ids, generation_config, model_kwargs,
                                        is_first_iteration=is_first_iteration)
            cache = outputs.get("cache")
            rooms.reserve_after(cache)
            if isinstance(cache, EncoderDecoderCache):  # the cross-attention: each prompt's encoder output per beam
                beams, layers = generation_config.num_beams, cache.cross_attention_cache.layers
                layers[:] = [CopiesLayer.of(layer, beams) if type(layer) is DynamicLayer and layer.is_initialized
                             and runs_of_copies(layer.keys, beams) and runs_of_copies(layer.values, beams) else layer
                             for layer in layers]
        return outputs

    model._prefill = prefill  # the beam search calls self._prefill once, before its loop
    try:
        return model._beam_search(input_ids, logits_processor, stopping_criteria, generation_config,
                                  synced_gpus=synced_gpus, **model_kwargs)
    finally:
        if previous is None:
            del model._prefill
        else:
            model._prefill = previous


def _prefill_once_per_prompt(model, prefill_every_row, input_ids, generation_config, model_kwargs: dict,
                             is_first_iteration: bool, rooms: DecodingRooms):
    """The prefill of a beam-expanded decoder-only batch computed on one copy of each prompt, then copied to its
    beams: logits, and a cache whose layers hold each prompt's keys and values once per beam in ``rooms``
    (``RoomyLayer``). None where that is not sure to be the same computation:
    an encoder-decoder (its encoder already runs once per prompt), inputs other than token ids, attention mask and
    position ids, input preparation replaced by a wrapper that did not say what it adds (a prompt-learning
    method's wrapper, whose virtual tokens are then added to each prompt once, says so:
    ``methods.SharedBeginning``), a cache already holding something, or rows that are not ``num_beams`` copies of
    each prompt."""
    beams, cache = generation_config.num_beams, model_kwargs.get("cache")
    per_row = _per_row_inputs(model_kwargs)
    if not _rows_can_be_prefilled_apart(model, model_kwargs, shared_beginning(model)) or not is_first_iteration \
            or beams < 2 or input_ids.shape[0] % beams:
        return None
    copies = {key: model_kwargs[key].unflatten(0, (-1, beams)) for key in per_row}
    copies["input_ids"] = input_ids.unflatten(0, (-1, beams))
    if not all(torch.equal(rows, rows[:, :1].expand_as(rows)) for rows in copies.values()):
        return None
    once = {**model_kwargs, **{key: model_kwargs[key][::beams] for key in per_row},
            "cache": DynamicCache(config=model.config)}
    outputs = prefill_every_row(input_ids[::beams], generation_config, once, is_first_iteration=True)
    cache.layers = [RoomyLayer.after(layer.keys, layer.values, rooms.room, rooms.whole_room, rooms.pool,
                                     copies=beams) for layer in outputs["cache"].layers]
    outputs["logits"], outputs["cache"] = outputs.logits.repeat_interleave(beams, dim=0), cache
    return outputs


# what test mode runs instead of transformers' own decoding, per search, and what records call it
OUR_DECODING = {"greedy": (greedy_decoding, "peft-nlg greedy"),
                "beam": (beam_search_with_shared_prefill, "peft-nlg beam (one prefill per prompt)")}


def onednn_packs_bf16() -> bool:
    """Whether this torch and CPU can pack a bf16 weight for oneDNN (not on AVX2-only CPUs such as some AMD
    EPYC machines here, where the reorder raises)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # contiguous weights only: a view of another's weight (peft's adapter on tied embeddings) is small and stays
    return (type(module) is torch.nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.is_contiguous() and "forward" not in vars(module))


@contextmanager
def packed_linear_weights(model, rows: int):
    """On a CPU in bf16, run every plain linear layer (the output head, each layer's projections, an adapter's own
    matrices) on a weight packed once for oneDNN's matrix product. Yields how many it packed.

    ``F.linear`` re-lays a bf16 weight out for oneDNN at every call. For the output head (a small model's largest
    product) a weight packed once took 5.4 against 9.8 ms for 64 rows on the 2-core AMX machine; for the 210
    projections of SmolLM2-135M's 30 layers, 76.8 against 94.2 ms at 128 rows and 144.8 against 155.1 ms at 256
    (2-core AVX-512 EPYC). The results are bit-identical for SmolLM2's products (the same kernels torch.compile's
    CPU backend packs for); products only 16 to 64 wide (a tiny test model's, an adapter's own) may differ in the
    last bit of a rare value, as torch runs other kernels for them. The packed copies cost the weights' memory
    once more while generating. An input in another dtype (fp32 where autocast would cast it) takes ``F.linear``
    as before. Anything else (GPU, fp32, a torch without oneDNN or a
    CPU oneDNN has no bf16 kernels for) is left as it is.
    """
    layers = [module for module in model.modules() if _packable(module)] if onednn_packs_bf16() else []
    for layer in layers:
        layer.forward = _packed_forward(layer.weight.detach(), layer.bias, rows)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != torch.bfloat16:
            return torch.nn.functional.linear(hidden, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(hidden, packed, bias, "none", [], "")
    return forward


# a generation batch's keys and values at most, where its token budget is left to the model (batch_tokens 0,
# the CPU default), and the most tokens then: SmolLM2-135M in bf16 holds 23 KB a token (30 layers, 3 key/value
# heads of 64), so 65,536 tokens (256 rows of test mode's longest dialogue prompts) take 1.5 GB; a model of
# 1.7B parameters (24 layers, 32 heads of 64: 196 KB a token) gets 8,192
CACHE_BYTES = 1.5 * 2**30
MAX_CACHE_TOKENS = 65536


def cache_token_budget(config, dtype: torch.dtype) -> int:
    """Tokens (prompt and new) whose keys and values fill ``CACHE_BYTES`` in ``dtype``, at most
    ``MAX_CACHE_TOKENS``; an encoder-decoder's cross-attention counted as much again."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    layers = getattr(config, "decoder_layers", None) or config.num_hidden_layers
    per_token = layers * 2 * kv_heads * head_dim * dtype.itemsize * (2 if config.is_encoder_decoder else 1)
    return max(1, min(MAX_CACHE_TOKENS, int(CACHE_BYTES // per_token)))


@torch.no_grad()
def generate(model, tokenizer, prompter: Prompter, sources: list[str], settings: DecodingSettings,
             dev: torch.device, dtype: torch.dtype = torch.float32, show_progress: bool = True
             ) -> tuple[list[str], dict]:
    """Generate one output per source; returns texts in input order and speed statistics."""
    model.eval()
    prompts = [{"input_ids": ids} for ids in prompter.prompts(sources)]
    # beams multiply the live sequences, so shrink the prompt budget to keep memory flat
    width = settings.num_beams if settings.search == "beam" else 1
    batch_tokens = settings.batch_tokens or cache_token_budget(model.config, dtype)
    batches = token_budget_batches([len(p["input_ids"]) + settings.max_new_tokens for p in prompts],
                                   max(batch_tokens // width, 1), settings.max_batch_size)
    outputs: list[str] = [""] * len(sources)
    new_tokens = 0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if settings.search == "sample":
        torch.manual_seed(settings.seed)
    if settings.greedy_loop not in ("auto", "ours", "transformers"):
        raise ValueError(f"greedy_loop must be auto, ours or transformers, not '{settings.greedy_loop}'")
    ours = settings.greedy_loop == "ours" or (settings.greedy_loop == "auto" and dev.type == "cpu")
    # our decoding code where it was measured faster (the CPU); transformers' own elsewhere until measured there
    ours_for_search = OUR_DECODING.get(settings.search) if ours else None
    loop = {"custom_generate": ours_for_search[0]} if ours_for_search else {}
    pick_attention = decoding_attention_for(settings.decode_attention, ours_for_search is not None, dev, dtype,
                                            model.config)
    attended = Counter()  # batches by the attention they decoded with
    declined_before = KERNEL_DECLINED[0]
    synchronize(dev)
    started = time.perf_counter()
    with (packed_linear_weights(model, settings.max_batch_size * width) as packed_layers,
          torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32),
          attention_kernels(settings.cudnn_attention)):
        for indices in tqdm(batches, desc="generate", disable=not show_progress, dynamic_ncols=True):
            with decoding_attention(model, pick_attention(len(indices))) as implementation:
                attended[ATTENTION_NAMES[implementation]] += 1
                generated = _generate_batch(model, [prompts[i] for i in indices], settings, prompter, pad, eos,
                                            dev, loop)
            for row, index in zip(generated.tolist(), indices, strict=True):
                kept = _until_eos(row, eos, pad, prompter.family.is_encoder_decoder)
                new_tokens += len(kept)
                outputs[index] = tokenizer.decode(kept, skip_special_tokens=True).strip()
    synchronize(dev)
    seconds = time.perf_counter() - started
    declined = KERNEL_DECLINED[0] - declined_before
    described = [name if len(attended) == 1 and not declined else f"{name} in {count} of {len(batches)} batches"
                 for name, count in attended.most_common()]
    if declined:  # say so: these steps ran at the products' speed
        described.append(f"room products for {declined} layer steps the kernel declined")
    stats = {"generate_seconds": round(seconds, 3), "new_tokens": new_tokens,
             "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1), "batches": len(batches),
             "batch_tokens": batch_tokens,
             "attention_kernels": attention_kernel_names(settings.cudnn_attention),
             "decode_attention": ", ".join(described),
             "decoding_loop": ours_for_search[1] if ours_for_search else "transformers",
             "linear_weights": f"oneDNN packed ({packed_layers} layers)" if packed_layers else "as loaded"}
    return outputs, stats


def decoding_attention_for(setting: str, ours: bool, dev: torch.device, dtype: torch.dtype, model_config):
    """The decoding attention (ROOM_KERNEL, ROOM_PRODUCTS or None: the model's own) for a batch of so many rows,
    as a function of the rows, for the ``decode_attention`` setting; ``ours``: our decoding loop runs."""
    if setting not in ("auto", "kernel", "products", "sdpa"):
        raise ValueError(f"decode_attention must be auto, kernel, products or sdpa, not '{setting}'")
    if setting == "products":
        return lambda rows: ROOM_PRODUCTS
    if setting == "sdpa" or (setting == "auto" and (not ours or dev.type != "cpu")):
        return lambda rows: None
    why_not = (f"it runs in bf16 on a CPU, not in {str(dtype).removeprefix('torch.')} on {dev.type}"
               if dev.type != "cpu" or dtype != torch.bfloat16
               else cpu_kernels.decode_attention_misfit(model_config) or cpu_kernels.decode_attention_unavailable())
    if setting == "kernel":
        if why_not:
            raise ValueError(f"decode_attention kernel: {why_not}")
        return lambda rows: ROOM_KERNEL
    if not why_not:
        return lambda rows: ROOM_KERNEL
    return lambda rows: ROOM_PRODUCTS if rows >= ROOM_PRODUCTS_MIN_ROWS else None


def _generate_batch(model, prompts: list[dict], settings: DecodingSettings, prompter: Prompter, pad: int, eos: int,
                    dev: torch.device, loop: dict) -> torch.Tensor:
    """One batch's generated ids (an encoder-decoder's from its start token, a decoder-only's after the prompt)."""
    batch = collate(prompts, pad, prompter.family.padding_side)
    batch = {k: v.to(dev) for k, v in batch.items()}
    # padding is never a word: ruling it out keeps an undertrained model from "writing" blanks
    processors = LogitsProcessorList([NeverEmit(pad)])
    if settings.no_repeat_ngram:  # an encoder-decoder's decoder starts from one start token
        prompt_width = 1 if prompter.family.is_encoder_decoder else batch["input_ids"].shape[1]
        processors.append(NoRepeatInOutput(settings.no_repeat_ngram, prompt_width))
    generated = model.generate(**batch, eos_token_id=eos, pad_token_id=pad, logits_processor=processors,
                               **settings.generate_kwargs(), **loop)
    if not prompter.family.is_encoder_decoder:
        generated = generated[:, batch["input_ids"].shape[1]:]
    return generated


def _until_eos(row: list[int], eos: int, pad: int, skip_first: bool) -> list[int]:
    """Tokens produced before EOS; encoder-decoder output starts with the decoder start token."""
    row = row[1:] if skip_first else row
    kept = []
    for token in row:
        if token == eos:
            break
        kept.append(token)
    while kept and kept[-1] == pad:
        kept.pop()
    return kept
