"""Generation: prefill + decode over a KV cache, sampling, stop ids and stop strings, and a streaming iterator.

Responsibilities: turning a prompt (token ids) into a stream of new tokens with reproducible sampling
(a seeded CPU ``torch.Generator`` so a seed gives the same tokens on every device), and text deltas that never
contain half a UTF-8 character or any part of a stop string; on request (``SamplingParams.logprobs``), each token's
log-probability under the target's logits at its position (``token_logprobs``: fp32, temperature 1, before
penalties, top-k and top-p; with drafts, from the verification forward that accepted it), computed only then.
Presence and frequency penalties (``sampling.Penalties``) change what every mode samples from, never the log-probs.
Not responsible for: loading (``loader``), chat templates (``tokenizer``), or where experts run (the experts backend
it is handed).

Also holds the device/dtype choice shared by the CLI and the node: ``pick_device`` and ``pick_dtype``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ekmesh.core.errors import ConfigError, GenerationError
from ekmesh.infer.batching import StepBatcher
from ekmesh.infer.cuda_graph import GraphDecoder
from ekmesh.infer.experts import ExpertsBackend, LocalExperts
from ekmesh.infer.models.cache import KVCache
from ekmesh.infer.models.common import CausalLM
from ekmesh.infer.sampling import MAX_PENALTY, Penalties
from ekmesh.infer.speculative import (
    MODES,
    Drafter,
    DraftLength,
    Draws,
    NgramDrafter,
    accept,
    check_mode,
    target_probs,
)

if TYPE_CHECKING:
    from ekmesh.infer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GRAPH_BUCKET = 1024  # static KV cache capacity granularity for CUDA-graph decode
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (``SamplingParams.logprobs``)
MAX_REBUILDS = 8  # rebuilds of one forward in a row (each follows a ban, and a banned member stays banned)

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def pick_device(name: str | None = None) -> torch.device:
    """``None``/"auto": cuda, else mps, else cpu. An explicit device that is not available is a ConfigError."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or mps)")
    return dev


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bf16 on cuda, fp16 on mps, fp32 on cpu."""
    if name in (None, "", "auto"):
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r} (use {', '.join(sorted(_DTYPES))} or auto)")
    return _DTYPES[name]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_ids: frozenset[int] | None = None  # None = the model's defaults (tokenizer / generation_config)
    stop_strings: tuple[str, ...] = ()
    speculative: str | None = None  # "off" | "ngram" | "draft"; None: the generator's default
    # log-probs: None = none computed; N = each token's log-prob and the N most likely alternatives (TokenEvent)
    logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this from the logit of every token generated so far
    frequency_penalty: float = 0.0  # and minus this times how often it was generated (``sampling.Penalties``)

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop strings must not be empty")
        if self.speculative is not None and self.speculative not in MODES:
            raise GenerationError(f"speculative must be one of {', '.join(MODES)}, got {self.speculative!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise GenerationError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise GenerationError(f"{name} must be in [{-MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)}")


@dataclass
class TokenEvent:
    """One generated token; ``text`` is the newly printable text (may be empty while a stop string is pending).
    With ``SamplingParams.logprobs`` set: ``logprob``, the token's log-probability, and ``top``, the most likely
    tokens as (id, log-prob), most likely first (``token_logprobs``); else both None."""

    token_id: int
    text: str
    finish: str | None = None  # set on the last event: "stop" (stop id or stop string) or "length"
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


Logprobs = list[tuple[float, list[tuple[int, float]]]]  # per position: (log p(token), [(id, log p)] most likely first)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> Logprobs:
    """logits [T, V] and the token that follows each position -> per position (log p(token), the ``top`` most
    likely (id, log p), most likely first). The model's own distribution: fp32 log-softmax of the logits, at
    temperature 1 and before top-k / top-p, whatever the request samples with."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    ids = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()  # [T]
    k = min(top, lp.shape[-1])
    if not k:
        return [(c, []) for c in chosen]
    best = torch.topk(lp, k, dim=-1)  # values, indices [T, k]
    return [(c, list(zip(i, v, strict=True))) for c, i, v in zip(chosen, best.indices.tolist(), best.values.tolist(),
                                                                strict=True)]


@dataclass
class StreamStats:
    """How one answer was decoded: target forward passes after the prefill (``steps``), tokens drafted and accepted,
    and data-plane round trips per MoE layer over the whole answer (prefill included; None without a mesh)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    round_trips: float | None = None
    speculative: str = "off"
    rounds: int = 0  # data-plane rounds counted so far (round_trips × MoE layers)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop id or stop string) or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    timings: dict[str, float] = field(default_factory=dict)
    stats: StreamStats = field(default_factory=StreamStats)


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [V] (already penalised: ``Penalties.apply``) -> next id. Greedy at temperature 0; else temperature,
    top-k, top-p, then a seeded draw."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = target_probs(logits, params.temperature, params.top_k, params.top_p)  # [V]
    return int(torch.multinomial(probs, 1, generator=gen))


class Generator:
    """Runs a ``CausalLM`` with an experts backend to produce tokens for one sequence at a time.

    ``retractions``: a counter that the experts backend raises whenever results it handed out before may have been
    wrong (a member was banned for lying: results of it that went unchecked are in caches and hidden states). A
    stream that sees it change since its cache was built builds the cache again from its tokens in one prefill
    (without the banned member) and recomputes the step's logits, so every token from then on is the one an honest
    mesh gives for the tokens so far. Tokens already sent stay as they were."""

    def __init__(self, model: CausalLM, experts: ExpertsBackend | None, tokenizer: Tokenizer | None = None,
                 default_stop_ids: Sequence[int] = (), cuda_graphs: bool | None = None,
                 retractions: Callable[[], int] | None = None, speculative: str = "off",
                 round_trips: Callable[[], int] | None = None, draft: Callable[[], Drafter] | None = None,
                 fuse: str = "all") -> None:
        self.model = model
        self.fuse = fuse  # the CUDA-graph decode step's fusion level (``fusion.LEVELS``)
        self.experts = experts
        self.retractions = retractions
        self.speculative = check_mode(speculative)  # a request may choose another (SamplingParams.speculative)
        self.round_trips = round_trips  # data-plane rounds made by this thread so far (None: no mesh)
        self.draft = draft  # a new drafter per answer for mode "draft" (e.g. a draft model with its own cache)
        self.batcher = StepBatcher(model, experts, round_trips)  # concurrent conversations' steps, batched
        self._lengths = {"ngram": DraftLength(), "draft": DraftLength()}  # k per mode, learnt across answers
        self.moe_layers = max(1, sum(1 for m in model.config.moe_layers if m))
        self.recomputed_tokens = 0  # tokens computed again after a retraction, over this generator's life
        self.tokenizer = tokenizer
        self.default_stop_ids = frozenset(default_stop_ids) | (tokenizer.stop_ids if tokenizer else frozenset())
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        if cuda_graphs is None:  # auto: on CUDA, with every expert held locally
            moe = [i for i, m in enumerate(model.config.moe_layers) if m]
            cuda_graphs = (self.device.type == "cuda" and isinstance(experts, LocalExperts)
                           and experts.holds_all(moe))
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, GraphDecoder] = {}

    def _graph_for(self, total: int) -> GraphDecoder:
        cap = max(GRAPH_BUCKET, -(-total // GRAPH_BUCKET) * GRAPH_BUCKET)
        runner = self._graphs.get(cap)
        if runner is None:
            assert isinstance(self.experts, LocalExperts)
            self._graphs.clear()  # one static cache at a time
            runner = self._graphs[cap] = GraphDecoder(self.model, self.experts, cap, self.fuse)
        return runner

    def _check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise GenerationError("the prompt is empty")
        bad = [i for i in prompt_ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    @torch.inference_mode()
    def logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] (fp32) for every prompt position: one prefill, no sampling."""
        self._check_prompt(prompt_ids)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        return self._prefill(ids, last_only=False)[1].float()

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int) -> Logprobs:
        """``token_logprobs`` of prompt tokens 1..T-1 (each given the tokens before it), from one prefill."""
        return token_logprobs(self.logits(prompt_ids)[:-1], prompt_ids[1:], top)

    def _retracted(self) -> int:
        return self.retractions() if self.retractions is not None else 0

    def _prefill(self, ids: torch.Tensor, last_only: bool) -> tuple[KVCache, torch.Tensor, int, int]:
        """(cache, logits [T or 1, V], the retraction count it was built under, the data-plane rounds it made): one
        forward over ``ids`` [1, T], in one batch with the steps of the other conversations waiting now (so
        conversations that start together share their prefills' round trips), again while a retraction happened
        during it."""
        rounds = 0
        for _ in range(MAX_REBUILDS):
            seen = self._retracted()
            cache = self.model.new_cache()
            logits, made, _ = self.batcher.step(ids, cache, last_only)
            rounds += made
            if self._retracted() == seen:
                break
            self.recomputed_tokens += ids.shape[1]
            log.info("a member was banned during a forward of %d tokens: computing it again", ids.shape[1])
        return cache, logits, seen, rounds

    def check(self, params: SamplingParams) -> None:
        """Raises ``GenerationError`` for parameters this generator cannot honour (before anything is generated)."""
        params.validate()
        if (params.speculative or self.speculative) == "draft" and self.draft is None:
            raise GenerationError("speculative mode 'draft' needs a draft model (--draft MODEL), and none is loaded")

    def _drafter(self, mode: str) -> Drafter | None:
        if mode == "off":
            return None
        if mode == "ngram":
            return NgramDrafter()
        assert self.draft is not None  # (check)
        return self.draft()

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
               stats: StreamStats | None = None) -> Iterator[TokenEvent]:
        """Yields one ``TokenEvent`` per generated token. The last event's token may be a stop id. ``stats`` (if
        given) is filled in as the answer is decoded."""
        self.check(params)
        self._check_prompt(prompt_ids)
        stats = stats if stats is not None else StreamStats()
        stats.speculative = mode = params.speculative or self.speculative
        drafter = self._drafter(mode)
        draws = None  # one generator per answer position (speculative.Draws): the same tokens for a seed in any mode
        if params.temperature > 0:
            draws = Draws(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        emit = _Emitter(self, params)
        if params.max_tokens == 0:
            return
        if self.cuda_graphs and drafter is None:  # (every expert local: no mesh, no round trips)
            runner = self._graph_for(len(prompt_ids) + params.max_tokens)
            logits = runner.prefill(prompt_ids)
            while True:
                ev = emit(sample_next(emit.penalties.apply(logits), params, draws(emit.position) if draws else None),
                          logits)
                yield ev
                if ev.finish:
                    return
                logits = runner.step(ev.token_id)
                stats.steps += 1
        self.batcher.joined()
        try:
            yield from self._decode(list(prompt_ids), params, draws, emit, drafter, stats)
        finally:
            self.batcher.left()
            if self.round_trips is not None:
                stats.round_trips = stats.rounds / self.moe_layers

    def _decode(self, tokens: list[int], params: SamplingParams, draws: Draws | None, emit: _Emitter,
                drafter: Drafter | None, stats: StreamStats) -> Iterator[TokenEvent]:
        """The eager decode loop: each step feeds the current token and up to k drafts in one forward and keeps the
        drafts the target accepts (``speculative.py``); without a drafter, one token a step."""
        dev = self.device
        cache, built, seen, rounds = self._prefill(torch.tensor([tokens], dtype=torch.long, device=dev), True)
        stats.rounds += rounds
        logits = built[-1]  # [V]
        length = self._lengths.get(params.speculative or self.speculative) if drafter is not None else None
        forced: int | None = None  # the token speculative sampling drew at a rejection
        while True:
            nxt = forced if forced is not None else sample_next(emit.penalties.apply(logits), params,
                                                                draws(emit.position) if draws else None)
            ev = emit(nxt, logits)  # (a forced token was drawn at the rejected position: ``logits`` is out[n])
            yield ev
            if ev.finish:
                return
            tokens.append(nxt)
            draft: list[int] = []
            start = time.perf_counter()  # (a step's cost includes drafting it)
            if drafter is not None and length is not None:
                k = length.choose(emit.left)
                for d in drafter.propose(tokens, k)[:k] if k else []:
                    if not 0 <= d < self.vocab_size:  # (a draft model's padded vocabulary)
                        break
                    draft.append(int(d))
            before = cache.length
            fed = [nxt, *draft]
            # [1 + len(draft), V] (or [1, V]), in one forward with the steps of other conversations waiting now
            out, rounds, _ = self.batcher.step(torch.tensor([fed], dtype=torch.long, device=dev), cache, not draft)
            stats.steps += 1
            stats.rounds += rounds
            if self._retracted() != seen:
                # a ban since this cache was built (in this step, or in another conversation's): the cache may
                # hold a liar's unchecked results, so it is built again from every token so far
                log.info("a member was banned: recomputing this conversation's cache (%d tokens)",
                         len(tokens) + len(draft))
                self.recomputed_tokens += len(tokens) + len(draft)
                cache, again, seen, rounds = self._prefill(
                    torch.tensor([tokens + draft], dtype=torch.long, device=dev), False)
                stats.rounds += rounds
                out = again[-len(fed):]
            if not draft:
                logits, forced = out[-1], None
                if length is not None:
                    length.update(0, 0, time.perf_counter() - start)
                continue
            # row i is penalised with the counts of the tokens before it: the current one and drafts 0..i-1
            n, forced = accept(emit.penalties.rows(out, fed), draft, params.temperature, params.top_k, params.top_p,
                               draws, emit.position)
            assert length is not None
            length.update(len(draft), n, time.perf_counter() - start)
            stats.drafted += len(draft)
            stats.accepted += n
            if n < len(draft):
                cache.truncate(before + 1 + n)  # the rejected drafts' positions
            logits = out[n]
            for i, d in enumerate(draft[:n]):
                tokens.append(d)
                ev = emit(d, out[i])  # the verification forward's logits where d was accepted
                yield ev
                if ev.finish:
                    return

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams()) -> GenerationResult:
        """Runs ``stream`` to the end. ``token_ids`` excludes a final stop id; ``text`` excludes stop strings."""
        stops = self.default_stop_ids if params.stop_ids is None else params.stop_ids
        t0 = time.perf_counter()
        first: float | None = None
        tokens: list[int] = []
        parts: list[str] = []
        reason = "length"
        stats = StreamStats()
        for ev in self.stream(prompt_ids, params, stats):
            if first is None:
                first = time.perf_counter()
            parts.append(ev.text)
            if not (ev.finish == "stop" and ev.token_id in stops):
                tokens.append(ev.token_id)
            reason = ev.finish or reason
        end = time.perf_counter()
        ttft = (first or end) - t0
        rate = (len(tokens) - 1) / (end - first) if first is not None and len(tokens) > 1 and end > first else 0.0
        return GenerationResult(tokens, "".join(parts), reason, len(prompt_ids), ttft, rate, stats=stats)


class _Emitter:
    """Turns generated ids into ``TokenEvent``s: text deltas, stop ids, stop strings, ``max_tokens``. ``left``: how
    many tokens may still follow."""

    def __init__(self, gen: Generator, params: SamplingParams) -> None:
        self.stops = gen.default_stop_ids if params.stop_ids is None else params.stop_ids
        self.decoder = gen.tokenizer.stream_decoder() if gen.tokenizer else None
        self.filter = _StopStringFilter(params.stop_strings)
        self.left = self.max_tokens = params.max_tokens
        self.logprobs = params.logprobs
        self.penalties = Penalties(params.presence_penalty, params.frequency_penalty)  # counts of emitted tokens

    @property
    def position(self) -> int:
        """The answer position of the next token (how many were emitted)."""
        return self.max_tokens - self.left

    def __call__(self, token: int, logits: torch.Tensor) -> TokenEvent:
        """``logits`` [V]: the target's at the position ``token`` was chosen for (read only for log-probs)."""
        ev = self._event(token)
        self.penalties.add(token)
        if self.logprobs is not None:
            ev.logprob, ev.top = token_logprobs(logits[None], [token], self.logprobs)[0]
        return ev

    def _event(self, token: int) -> TokenEvent:
        assert self.left > 0
        self.left -= 1
        dec, flt = self.decoder, self.filter
        if token in self.stops:
            return TokenEvent(token, flt.push(dec.flush()) + flt.flush() if dec else "", "stop")
        out = flt.push(dec.push(token)) if dec else ""
        if flt.hit:
            return TokenEvent(token, out, "stop")
        if self.left == 0:
            tail = flt.push(dec.flush()) + flt.flush() if dec else ""
            return TokenEvent(token, out + tail, "stop" if flt.hit else "length")
        return TokenEvent(token, out)


class _StopStringFilter:
    """Passes text through, holding back any suffix that could start a stop string; stops at the first match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out = "" if self.hit else self.pending
        self.pending = ""
        return out
