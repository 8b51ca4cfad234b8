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
from kvbench.compression import CompressionStats, compress
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
    ttft_seconds: float
    seconds_per_token: float


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
    would not fit loses the middle of its context, as LongBench's pred.py cuts the middle of the prompt
    to the model's length minus the generation budget; ``Prompt.truncated_tokens`` says how much went.
    """
    if query_aware and len(questions) != 1:
        raise ValueError("query_aware compresses the question with the context, so each context takes one question")
    budgets = _budgets(max_new_tokens, len(questions))
    use_chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template and has_chat_template(tokenizer)
    marker_context, marker_question = "\x00KVBENCH_CONTEXT\x00", "\x00KVBENCH_QUESTION\x00"
    if use_chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker_context + marker_question}], add_generation_prompt=True, tokenize=False
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
        # Cut the middle of the context itself: as many context tokens kept before the cut as after it.
        head = fixed_start + (room - fixed_start - fixed_end) // 2
        context_ids, cut = truncate_middle(context_ids, room, head)
    return Prompt(context_ids=context_ids, question_ids=question_ids, truncated_tokens=cut)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _cache(model, cache) -> dict:
    return {model_access.cache_argument(model): cache}


def base_model(model):
    """The decoder stack (``model.model`` for Llama-likes, ``model.gpt_neox`` for Pythia)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


@torch.no_grad()
def prefill(model, context_ids: torch.Tensor, press: Press) -> tuple[DynamicCache, float, CompressionStats, torch.Tensor]:
    """Run the context through the decoder with compression; return cache, seconds, stats, last hidden state."""
    device = model.device
    cache = DynamicCache(config=model.config)
    synchronize(device)
    start = time.perf_counter()
    with compress(model, press) as stats:
        out = base_model(model)(input_ids=context_ids.to(device), **_cache(model, cache), use_cache=True)
    synchronize(device)
    return cache, time.perf_counter() - start, stats, out.last_hidden_state[:, -1:]


@torch.no_grad()
def greedy_decode(model, cache, question_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], float, float]:
    """Greedy decoding until an EOS id or ``max_new_tokens``; returns tokens, time to first token, s/token."""
    device = model.device
    synchronize(device)
    start = time.perf_counter()
    logits = model(input_ids=question_ids.to(device), **_cache(model, cache), use_cache=True, logits_to_keep=1).logits
    tokens: list[int] = []
    next_id = int(logits[0, -1].argmax())
    synchronize(device)
    ttft = time.perf_counter() - start
    decode_start = time.perf_counter()
    while True:
        tokens.append(next_id)
        if next_id in eos_ids or len(tokens) >= max_new_tokens:
            break
        step = torch.tensor([[next_id]], device=device)
        logits = model(input_ids=step, **_cache(model, cache), use_cache=True).logits
        next_id = int(logits[0, -1].argmax())
    synchronize(device)
    per_token = (time.perf_counter() - decode_start) / max(len(tokens) - 1, 1)
    return tokens, ttft, per_token


def answer_questions(model, tokenizer, prompt: Prompt, press: Press, max_new_tokens: int | list[int]) -> ContextRun:
    """One compressed prefill, then each question decoded from the same cache state."""
    device = model.device
    reset_peak_memory(device)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt.question_ids)
    cache, prefill_seconds, stats, _ = prefill(model, prompt.context_ids, press)
    after = kv_bytes(cache)
    lengths = stored_lengths(cache)
    eos = eos_token_ids(model, tokenizer)
    answers = []
    for question_ids, budget in zip(prompt.question_ids, budgets):
        tokens, ttft, per_token = greedy_decode(model, cache, question_ids, budget, eos)
        truncate(cache, lengths)  # the next question sees the compressed context, not this answer
        text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        answers.append(Answer(text=text.strip(), token_ids=tokens, ttft_seconds=ttft, seconds_per_token=per_token))
    return ContextRun(
        answers=answers,
        context_tokens=prompt.context_ids.shape[-1],
        prefill_seconds=prefill_seconds,
        compression=stats,
        kv_bytes_after=after,
        peak_memory_bytes=peak_memory_bytes(device),
    )


@torch.no_grad()
def continuation_nll(model, context_ids: torch.Tensor, continuation_ids: torch.Tensor, press: Press) -> tuple[float, int, ContextRun]:
    """Summed negative log-likelihood of ``continuation_ids`` given the (compressed) context.

    The first continuation token is predicted from the context's last position (prefill output, which
    compression does not change); the others are teacher-forced over the compressed cache.
    """
    device = model.device
    reset_peak_memory(device)
    cache, prefill_seconds, stats, last_hidden = prefill(model, context_ids, press)
    after = kv_bytes(cache)
    continuation_ids = continuation_ids.to(device)
    first_logits = model.get_output_embeddings()(last_hidden)
    synchronize(device)
    start = time.perf_counter()
    logits = first_logits
    if continuation_ids.shape[-1] > 1:  # a one-token continuation is scored by the prefill output alone
        rest_logits = model(input_ids=continuation_ids[:, :-1], **_cache(model, cache), use_cache=True).logits
        logits = torch.cat([first_logits, rest_logits], dim=1)
    synchronize(device)
    forced_seconds = time.perf_counter() - start
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0], continuation_ids[0], reduction="sum")
    run = ContextRun(
        answers=[],
        context_tokens=context_ids.shape[-1],
        prefill_seconds=prefill_seconds,
        compression=stats,
        kv_bytes_after=after,
        peak_memory_bytes=peak_memory_bytes(device),
        extra={"teacher_forced_seconds": forced_seconds},
    )
    return float(nll), int(continuation_ids.shape[-1]), run
