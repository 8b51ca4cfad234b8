"""Prefill (+ compression) once, then answer several questions greedily over the shared compressed cache;
or teacher-force a continuation for perplexity.

Prompts: with a chat template, context and question share the user turn and ``answer_prefix`` opens the
assistant turn; the token ids are split right after the context so only the context is compressed (or
after the question, when ``query_aware``). Without a template the text is plain concatenation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvbench import model_access
from kvbench.compression import CompressionStats, Target, compress_into
from kvbench.compression.cache import kv_bytes, stored_lengths, truncate
from kvbench.device import peak_memory_bytes, reset_peak_memory, synchronize
from kvbench.errors import KVBenchError
from kvbench.presses.base import Press


@dataclass
class Prompt:
    context_ids: torch.Tensor  # [1, n] - what gets prefilled and compressed
    question_ids: list[torch.Tensor]  # one [1, m] per question - never compressed
    truncated_tokens: int = 0


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    question_seconds: float  # the question's pass over the compressed cache, up to the first token (no prefill)
    seconds_per_token: float  # NaN when no token was decoded after the first


@dataclass
class ContextRun:
    """Answers to every question of one context, plus what the prefill and compression cost."""

    answers: list[Answer]
    context_tokens: int
    prefill_seconds: float
    compression: CompressionStats
    kv_bytes_after: int
    peak_memory_bytes: int | None  # None on CPU: no per-run peak exists there (kvbench.device)
    extra: dict = field(default_factory=dict)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str, add_special_tokens: bool) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]], dtype=torch.long)


def truncate_middle(ids: torch.Tensor, max_length: int | None, head: int | None = None) -> tuple[torch.Tensor, int]:
    """Keep the first ``head`` (default: half) and the last tokens, ``max_length`` in all; cut the middle.

    The beginning and the end hold the instructions and the most recent text (LongBench's rule).
    Returns the ids and how many tokens were cut.
    """
    n = ids.shape[-1]
    if max_length is None or n <= max_length:
        return ids, 0
    head = max_length // 2 if head is None else max(0, min(head, max_length))
    return torch.cat([ids[..., :head], ids[..., n - (max_length - head) :]], dim=-1), n - max_length


def _budgets(max_new_tokens: int | list[int], count: int) -> list[int]:
    budgets = [int(max_new_tokens)] * count if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != count:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {count} questions")
    return budgets


def build_prompt(
    tokenizer,
    context: str,
    questions: list[str],
    answer_prefix: str = "",
    *,
    use_chat_template: bool | None = None,
    query_aware: bool = False,
    max_length: int | None = None,
    max_new_tokens: int | list[int] = 0,
) -> Prompt:
    """Token ids for one context and its questions. ``query_aware`` needs exactly one question.

    ``max_length`` bounds every sequence the model sees: the templated context, one question with the
    answer prefix, and that question's ``max_new_tokens`` (one int, or one per question). A prompt that
    would not fit loses the middle of its context where LongBench's pred.py cuts the middle of its prompt (the
    first half of context + question kept, and the last half, which holds the question); the question itself is
    never cut. ``Prompt.truncated_tokens`` says how much went.
    """
    if query_aware and len(questions) != 1:
        raise ValueError("query_aware compresses the question with the context, so each context takes one question")
    budgets = _budgets(max_new_tokens, len(questions))
    use_chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template and has_chat_template(tokenizer)
    marker_context, marker_question = "\x00KVBENCH_CONTEXT\x00", "\x00KVBENCH_QUESTION\x00"
    if use_chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker_context + marker_question}], add_generation_prompt=True, tokenize=False,
            enable_thinking=False,  # Qwen3's template thinks unless told not to; kvpress' pipeline says not to
        )
    else:
        rendered = marker_context + marker_question
    before_context, rest = rendered.split(marker_context)
    between, after_question = rest.split(marker_question)
    # Plain text: let the tokenizer add BOS; a chat template writes its own special tokens.
    add_special = not use_chat
    if query_aware:
        context_ids = _ids(tokenizer, before_context + context + between + questions[0], add_special)
        question_ids = [_ids(tokenizer, after_question + answer_prefix, False)]
        fixed_end = _ids(tokenizer, between + questions[0], False).shape[-1]  # kept whole: it is the query
    else:
        context_ids = _ids(tokenizer, before_context + context, add_special)
        question_ids = [_ids(tokenizer, between + q + after_question + answer_prefix, False) for q in questions]
        fixed_end = 0
    cut = 0
    if max_length is not None:
        tail = max(q.shape[-1] + b for q, b in zip(question_ids, budgets))
        fixed_start = _ids(tokenizer, before_context, add_special).shape[-1]
        room = int(max_length) - tail
        if room < fixed_start + fixed_end + 1:
            raise KVBenchError(
                f"max_context_length={max_length} leaves no room for the context: the template, question, answer prefix "
                f"and max_new_tokens={max(budgets)} take {tail + fixed_start + fixed_end} tokens; raise max_context_length"
            )
        # LongBench's pred.py keeps the first and the last half of its whole prompt (context + question, no
        # template), so the context keeps that first half, and of the last half what the question leaves.
        kept = room - fixed_start - fixed_end
        question_end = max(_ids(tokenizer, q + answer_prefix, False).shape[-1] for q in questions)
        head = fixed_start + min(kept, (kept + question_end) // 2)
        context_ids, cut = truncate_middle(context_ids, room, head)
    return Prompt(context_ids=context_ids, question_ids=question_ids, truncated_tokens=cut)


def prompt_tokens(tokenizer, context: str, questions: list[str], answer_prefix: str = "", *,
                  use_chat_template: bool | None = None) -> int:
    """The longest sequence the model reads before answering: the templated context plus its longest question
    and answer prefix, in whichever layout (query-aware or not) tokenizes longer.

    This is what a length under test counts, as RULER counts its prompts with the model's template; the two
    layouts split the text at different places, so their token counts can differ by a merge at the join.
    """
    plain = build_prompt(tokenizer, context, questions, answer_prefix, use_chat_template=use_chat_template)
    seen = plain.context_ids.shape[-1] + max(q.shape[-1] for q in plain.question_ids)
    if len(questions) == 1:
        aware = build_prompt(tokenizer, context, questions, answer_prefix, use_chat_template=use_chat_template,
                             query_aware=True)
        seen = max(seen, aware.context_ids.shape[-1] + aware.question_ids[0].shape[-1])
    return seen


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def stop_token_ids(tokenizer, stop_text: str) -> set[int]:
    """The ids a question with a ``stop_text`` stops at, as LongBench's pred.py stops samsum: the tokenizer's EOS
    and the last id of the text's encoding, in place of the model's EOS set (``eos_token_id=[eos, nl]`` there).
    The first new token may be none of them (its ``min_length=context_length + 1``), so the answer is never empty."""
    encoded = tokenizer.encode(stop_text, add_special_tokens=False)
    if not encoded:
        raise KVBenchError(f"stop_text {stop_text!r} encodes to no token; use a text the tokenizer can encode")
    return {encoded[-1]} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _cache(model, cache) -> dict:
    return {model_access.cache_argument(model): cache}


def base_model(model):
    """The decoder stack (``model.model`` for Llama-likes, ``model.gpt_neox`` for Pythia)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


@dataclass
class Prefilled:
    """One prefill of a batch of contexts, compressed once per press.

    ``prefill_seconds`` is the prefill as one press alone would have taken it: the shared forward pass plus
    that press' own compression, without the other presses' (so a shared-prefill job reports what a solo job
    measures).
    """

    caches: list[DynamicCache]
    stats: list[CompressionStats]
    prefill_seconds: list[float]
    last_hidden: torch.Tensor  # [batch, 1, hidden]: each context's last real position
    lengths: list[int]
    rerotated: list[bool]
    rotary: model_access.RotaryState  # the rotary state right after the prefill: each press decodes from it

    def decoding(self, index: int) -> DynamicCache:
        """Press ``index``'s cache, with the model's rotary state put back to where the prefill left it (dynamic
        RoPE grows with the positions a press decodes; the next press must not inherit that)."""
        self.rotary.restore()
        return self.caches[index]

    def start_positions(self, index: int) -> list[int]:
        """Position of each context's next token over press ``index``'s cache: its length, or its kept count when
        the press re-rotated the kept keys to contiguous positions."""
        if not self.rerotated[index]:
            return list(self.lengths)
        layer = self.caches[index].layers[0]
        counts = layer.lengths[:, 0] if hasattr(layer, "lengths") else torch.full((len(self.lengths),), layer.keys.shape[-2])
        return [int(c) for c in counts]


def right_pad(sequences: list[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """[1, n_i] id tensors -> [b, max n]: real tokens first, so causal attention never lets them see padding."""
    longest = max(s.shape[-1] for s in sequences)
    return torch.cat([torch.nn.functional.pad(s, (0, longest - s.shape[-1]), value=pad_id) for s in sequences])


@torch.no_grad()
def prefill_many(model, contexts: list[torch.Tensor], presses: list[Press], layout: str = "packed") -> Prefilled:
    """Prefill ``contexts`` (each ``[1, n_i]``) as one right-padded batch and compress the result once per press.

    One context and one press compress the prefill's own cache in place (the solo path); otherwise each press
    gets its own cache and the prefill's is freed layer by layer.
    """
    device = model.device
    lengths = [int(c.shape[-1]) for c in contexts]
    batched = len(contexts) > 1
    ids = right_pad(contexts).to(device)
    cache = DynamicCache(config=model.config)
    solo = len(presses) == 1
    targets = [Target(p, None if solo else DynamicCache(config=model.config)) for p in presses]
    model_access.fresh_rotary_state(model).restore()
    synchronize(device)
    start = time.perf_counter()
    with compress_into(model, targets, lengths=lengths if batched else None, layout=layout):
        out = base_model(model)(input_ids=ids, **_cache(model, cache), use_cache=True)
    synchronize(device)
    shared = time.perf_counter() - start - sum(t.stats.seconds for t in targets)
    last = torch.tensor(lengths, device=device) - 1
    return Prefilled(
        caches=[cache if t.cache is None else t.cache for t in targets],
        stats=[t.stats for t in targets],
        prefill_seconds=[shared + t.stats.seconds for t in targets],
        last_hidden=out.last_hidden_state[torch.arange(len(lengths), device=device), last][:, None],
        lengths=lengths,
        rerotated=[p.rerotates_keys for p in presses],
        rotary=model_access.RotaryState.of(model),
    )


@torch.no_grad()
def prefill(model, context_ids: torch.Tensor, press: Press) -> tuple[DynamicCache, float, CompressionStats, torch.Tensor]:
    """Run the context through the decoder with compression; return cache, seconds, stats, last hidden state."""
    done = prefill_many(model, [context_ids], [press])
    return done.caches[0], done.prefill_seconds[0], done.stats[0], done.last_hidden


def _step(model, cache, ids: torch.Tensor, positions: torch.Tensor | None, validity, valid: torch.Tensor | None, **kwargs):
    """One forward over the cache; batched caches get explicit positions and the new slots' validity."""
    if validity is not None:
        validity.append(valid if valid is not None else torch.ones(ids.shape, dtype=torch.bool))
    extra = {} if positions is None else {"position_ids": positions.to(model.device)}
    return model(input_ids=ids.to(model.device), **_cache(model, cache), use_cache=True, **extra, **kwargs).logits


def _tail_validity(cache):
    return getattr(cache.layers[0], "tail_validity", None)


@torch.no_grad()
def greedy_decode_batch(model, cache, questions: list[torch.Tensor], max_new_tokens: list[int],
                        eos_ids: set[int] | list[set[int]], starts: list[int] | None = None,
                        first_token_bans: list[set[int]] | None = None,
                        context_logits: torch.Tensor | None = None) -> tuple[list[list[int]], float, float]:
    """Greedy decoding of one question per context (``[1, m_i]`` each) over a (batched) cache.

    Batch size 1 decodes as the model would on its own. A batch left-pads the questions so every context's last
    question token is the last column; the padding is invisible (tail validity) and positions continue from
    ``starts`` (each context's next position). Every context decodes until the longest budget; each keeps its
    tokens up to its own stop id (``eos_ids``: one set for all, or one per context) or budget. The first token of
    context ``i`` is the best one outside ``first_token_bans[i]`` (``generate``'s ``min_length``). A context whose
    question is empty (a query-aware prompt without template or answer prefix: the question was prefilled with the
    context) takes its first token from ``context_logits[i]``, the prefill's output at its last position, as
    ``generate`` would. Returns tokens, time to first token and seconds per later token.
    """
    empty = [q.shape[-1] == 0 for q in questions]
    if any(empty) and context_logits is None:
        raise ValueError("an empty question needs context_logits: its first token is the prefill's prediction")
    device = model.device
    batch = len(questions)
    stops = list(eos_ids) if isinstance(eos_ids, list) else [eos_ids] * batch
    validity = _tail_validity(cache) if batch > 1 else None
    if batch > 1:
        longest = max(q.shape[-1] for q in questions)
        ids = torch.cat([torch.nn.functional.pad(q, (longest - q.shape[-1], 0)) for q in questions])
        valid = torch.arange(longest)[None] >= torch.tensor([longest - q.shape[-1] for q in questions])[:, None]
        positions = (torch.tensor(starts)[:, None] + valid.long().cumsum(-1) - 1).clamp_min(0)
        next_position = torch.tensor(starts) + valid.sum(-1)
    else:
        ids, valid, positions, next_position = questions[0], None, None, None
    synchronize(device)
    start = time.perf_counter()
    if all(empty):
        logits = context_logits[:, -1].clone()
    else:
        logits = _step(model, cache, ids, positions, validity, valid, logits_to_keep=1)[:, -1]
        if any(empty):
            logits = torch.where(torch.tensor(empty, device=logits.device)[:, None], context_logits[:, -1], logits)
    if first_token_bans and any(first_token_bans):
        logits = logits.clone()
        for i, banned in enumerate(first_token_bans):
            if banned:
                logits[i, sorted(banned)] = float("-inf")
    next_ids = logits.argmax(-1).cpu()
    synchronize(device)
    ttft = time.perf_counter() - start
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    steps = 0
    decode_start = time.perf_counter()
    while True:
        for i in range(batch):
            if not done[i]:
                tokens[i].append(int(next_ids[i]))
                done[i] = tokens[i][-1] in stops[i] or len(tokens[i]) >= max_new_tokens[i]
        if all(done):
            break
        step_positions = None if next_position is None else (next_position + steps)[:, None]
        logits = _step(model, cache, next_ids[:, None], step_positions, validity, None)
        next_ids = logits[:, -1].argmax(-1).cpu()
        steps += 1
    synchronize(device)
    # no step decoded (the first token ended every answer): nothing measured, not a step of zero seconds
    per_token = (time.perf_counter() - decode_start) / steps if steps else float("nan")
    return tokens, ttft, per_token


@torch.no_grad()
def greedy_decode(model, cache, question_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], float, float]:
    """Greedy decoding until an EOS id or ``max_new_tokens``; returns tokens, time to first token, s/token."""
    tokens, ttft, per_token = greedy_decode_batch(model, cache, [question_ids], [max_new_tokens], eos_ids)
    return tokens[0], ttft, per_token


def _context_runs(prefilled: Prefilled, index: int, kv_after: int, peak: int | None, answers: list[list[Answer]],
                  extra: list[dict] | None = None) -> list[ContextRun]:
    """Per-context records of press ``index``. Batch-wide times (prefill, compression) are shared out evenly;
    bytes and kept pairs are each context's own (``_context_stats``)."""
    batch = len(prefilled.lengths)
    stats = [_context_stats(prefilled.stats[index], i, batch) for i in range(batch)]
    total_kept = sum(s.kept_pairs for s in stats)
    return [ContextRun(
        answers=answers[i],
        context_tokens=prefilled.lengths[i],
        prefill_seconds=prefilled.prefill_seconds[index] / batch,
        compression=stats[i],
        kv_bytes_after=kv_after if batch == 1 else round(kv_after * stats[i].kept_pairs / max(total_kept, 1)),
        peak_memory_bytes=peak,
        extra=extra[i] if extra else {},
    ) for i in range(batch)]


def _own_peak(device, presses: list[Press]) -> int | None:
    """The run's peak memory, or None when the prefill served several presses: it then held every press' compressed
    cache at once, a peak none of them would reach alone (``kvbench.benchmark`` measures each press' own)."""
    return peak_memory_bytes(device) if len(presses) == 1 else None


def _context_stats(stats: CompressionStats, i: int, batch: int) -> CompressionStats:
    """Context ``i``'s part of a batch's compression: its kept and total pairs, the bytes its unpadded cache held
    before (the padded batch's bytes in proportion to its length) and after (in proportion to what it kept)."""
    if batch == 1:
        return stats
    if not stats.kept_per_context:  # nothing was compressed (no layer ran the press)
        return CompressionStats(stats.seconds / batch, stats.kv_bytes_before // batch, stats.kv_bytes_after // batch,
                                stats.layers, stats.context_length, stats.kept_pairs // batch, stats.total_pairs // batch)
    length, kept = stats.context_lengths[i], stats.kept_per_context[i]
    padded = batch * stats.context_length
    total = stats.total_pairs * length // sum(stats.context_lengths)
    return CompressionStats(stats.seconds / batch, round(stats.kv_bytes_before * length / padded),
                            round(stats.kv_bytes_after * kept / max(sum(stats.kept_per_context), 1)),
                            stats.layers, stats.context_length, kept, total)


def answer_prompts(model, tokenizer, prompts: list[Prompt], presses: list[Press], max_new_tokens: list[list[int]],
                   layout: str = "packed", stop_texts: list[list[str | None]] | None = None) -> list[list[ContextRun]]:
    """One compressed prefill of a batch of prompts per press set; each question decoded from the shared cache.

    Returns one list per press with one ``ContextRun`` per prompt. Prompts with fewer questions than the others
    decode a copy of their last one, whose answer is dropped. ``stop_texts`` (one per question, None for none)
    end a question's answer at its text's token instead of at EOS (:func:`stop_token_ids`). An answer is the
    decoded text as generated, leading blanks and newlines included: LongBench scores exactly that.
    """
    device = model.device
    reset_peak_memory(device)
    prefilled = prefill_many(model, [p.context_ids for p in prompts], presses, layout)
    eos = eos_token_ids(model, tokenizer)
    stop_sets = {text: stop_token_ids(tokenizer, text) for texts in (stop_texts or []) for text in texts if text is not None}
    rounds = max(len(p.question_ids) for p in prompts)
    context_logits = None
    if any(q.shape[-1] == 0 for p in prompts for q in p.question_ids):
        context_logits = model.get_output_embeddings()(prefilled.last_hidden)  # [b, 1, V]: unchanged by compression
    out = []
    for index in range(len(presses)):
        cache = prefilled.decoding(index)
        after = kv_bytes(cache)
        lengths = stored_lengths(cache)
        answers: list[list[Answer]] = [[] for _ in prompts]
        for j in range(rounds):
            questions = [p.question_ids[min(j, len(p.question_ids) - 1)] for p in prompts]
            budgets = [b[min(j, len(b) - 1)] for b in max_new_tokens]
            texts = [t[min(j, len(t) - 1)] for t in stop_texts] if stop_texts else [None] * len(prompts)
            stops = [eos if text is None else stop_sets[text] for text in texts]
            bans = [set() if text is None else stop_sets[text] for text in texts]
            tokens, ttft, per_token = greedy_decode_batch(model, cache, questions, budgets, stops,
                                                          prefilled.start_positions(index), bans, context_logits)
            truncate(cache, lengths)  # the next question sees the compressed context, not this answer
            for i, (prompt, ids) in enumerate(zip(prompts, tokens)):
                if j < len(prompt.question_ids):
                    text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
                    answers[i].append(Answer(text=text, token_ids=ids, question_seconds=ttft, seconds_per_token=per_token))
        out.append(_context_runs(prefilled, index, after, _own_peak(device, presses), answers))
        prefilled.caches[index] = None  # decoded: its memory can go before the next press' decoding
    return out


def answer_questions(model, tokenizer, prompt: Prompt, press: Press, max_new_tokens: int | list[int]) -> ContextRun:
    """One compressed prefill, then each question decoded from the same cache state."""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt.question_ids)
    return answer_prompts(model, tokenizer, [prompt], [press], [budgets])[0][0]


@torch.no_grad()
def continuations_nll(model, contexts: list[torch.Tensor], continuations: list[torch.Tensor], presses: list[Press],
                      layout: str = "packed", decode_tokens: int = 0) -> list[list[tuple[float, int, ContextRun]]]:
    """Summed negative log-likelihood of each continuation given its (compressed) context, per press.

    The first continuation token is predicted from the context's last position (prefill output, which
    compression does not change); the others are teacher-forced over the compressed cache. A batch right-pads
    the continuations (padding comes after every real token, so no real token sees it).

    ``decode_tokens`` > 1 also times decoding, which teacher forcing (all tokens in one forward) does not show:
    after scoring, the cache is cut back to the compressed context and ``decode_tokens`` tokens are decoded
    greedily from each continuation's first token, as a generation run decodes (EOS ignored). The run's
    ``extra`` then has ``decode_seconds_per_token``; the scores are those of ``decode_tokens=0``.
    """
    device = model.device
    reset_peak_memory(device)
    prefilled = prefill_many(model, contexts, presses, layout)
    first_logits = model.get_output_embeddings()(prefilled.last_hidden)  # [b, 1, V]
    batch = len(contexts)
    targets = right_pad(continuations).to(device)
    out = []
    for index in range(len(presses)):
        cache = prefilled.decoding(index)
        after = kv_bytes(cache)
        compressed_lengths = stored_lengths(cache)
        synchronize(device)
        start = time.perf_counter()
        logits = first_logits
        if targets.shape[-1] > 1:  # a one-token continuation is scored by the prefill output alone
            positions = None
            if batch > 1:
                positions = torch.tensor(prefilled.start_positions(index))[:, None] + torch.arange(targets.shape[-1] - 1)
            rest = _step(model, cache, targets[:, :-1], positions, _tail_validity(cache) if batch > 1 else None, None)
            logits = torch.cat([first_logits, rest], dim=1)
        synchronize(device)
        forced_seconds = (time.perf_counter() - start) / batch
        logits = logits.float()
        scored = []
        for i, continuation in enumerate(continuations):
            n = continuation.shape[-1]
            scored.append(float(torch.nn.functional.cross_entropy(logits[i, :n], targets[i, :n], reduction="sum")))
        extra = {"teacher_forced_seconds": forced_seconds}
        if decode_tokens > 1:
            truncate(cache, compressed_lengths)
            firsts = [continuation[:, :1] for continuation in continuations]
            _, _, per_token = greedy_decode_batch(model, cache, firsts, [decode_tokens] * batch, set(),
                                                  prefilled.start_positions(index))
            extra["decode_seconds_per_token"] = per_token
        runs = _context_runs(prefilled, index, after, _own_peak(device, presses), [[] for _ in contexts],
                             [dict(extra) for _ in contexts])
        out.append([(nll, int(c.shape[-1]), run) for nll, c, run in zip(scored, continuations, runs)])
        prefilled.caches[index] = None
    return out


@torch.no_grad()
def continuation_nll(model, context_ids: torch.Tensor, continuation_ids: torch.Tensor, press: Press) -> tuple[float, int, ContextRun]:
    """``continuations_nll`` for one context and one press."""
    return continuations_nll(model, [context_ids], [continuation_ids], [press])[0][0]
