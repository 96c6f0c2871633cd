"""LLMEngine: the step loop. Requests in; each step schedules, runs one forward, samples, streams text out.

Cached requests go through the scheduler and the paged pool; no-cache requests (the seeds' baseline)
recompute their whole text every step in a batch of their own and never touch the pool.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from kvengine.accounting.flops import request_flops, span_flops, step_flops, step_total
from kvengine.batch import StepBatch
from kvengine.cache.block_manager import BlockManager
from kvengine.cache.block_tables import KVBlockTables
from kvengine.cache.disk_tier import KVDiskTier
from kvengine.cache.pool import KVPool
from kvengine.config import ModelConfig
from kvengine.engine.config import EngineConfig
from kvengine.engine.output import RequestMetrics, RequestOutput, TextTracker, VerifyReport
from kvengine.engine.prompt_logprobs import prompt_rows, split_rows
from kvengine.engine.runner import ModelRunner
from kvengine.engine.scheduler import ScheduledSeq, Scheduler
from kvengine.engine.sequence import FinishReason, Sequence, SequenceStatus
from kvengine.engine.stats import EngineStats, RequestBlocks
from kvengine.errors import RequestError, check_token_ids
from kvengine.sampling import Sample, Sampler, SampleRow, SamplingParams
from kvengine.structured import GrammarCompiler, available
from kvengine.weights.tokenizer import Tokenizer

# max |logit diff| between the cached run and the no-cache recomputation. fp32 differs only by accumulation
# order; bf16 logits of size ~30 are rounded to steps of 0.125-0.25, so a few steps of drift is expected.
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.0, torch.float16: 0.25}
T = TypeVar("T")


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    seq: Sequence
    tracker: TextTracker | None
    verify: bool


class LLMEngine:
    """Built by engine/assembly.py `build_engine` (which sizes the pool and prepares the model) from an
    EngineConfig; the engine reads its limits, device, seed and compile option from the config."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, config: EngineConfig, pool: KVPool,
                 max_model_len: int, disk: KVDiskTier | None = None, weights_desc: str = "") -> None:
        self.model = model
        self.model_config: ModelConfig = model.config
        # What a cached step's attention reads: a sink+window layer sees min(p + 1, S + W) keys, as a window of
        # S + W would (cache/retention.py); FLOPs of cached steps are counted with these windows.
        self.cached_flops_config = replace(self.model_config, layer_windows=tuple(
            None if r.window is None else r.window + r.sinks for r in pool.spec.retentions))
        self.tokenizer = tokenizer
        self.pool = pool
        prefix_caching = config.enable_prefix_caching and pool.spec.prefix_cacheable
        manager = BlockManager(pool.num_blocks, pool.spec.block_size, prefix_caching)
        self.block_tables = KVBlockTables(manager, pool.spec.groups)
        self.max_model_len = max_model_len
        self.disk = disk  # the KV disk tier (cache/disk_tier.py), None without --kv-disk-dir
        self.scheduler = Scheduler(self.block_tables, config.max_num_seqs, config.max_num_batched_tokens, disk)
        self.runner = ModelRunner(model, pool, self.block_tables, config.device, config.compile)
        self.sampler = Sampler(config.seed)
        self.dtype = next(model.parameters()).dtype
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._no_cache: list[Sequence] = []
        self._ids = itertools.count()
        self.eos_token_ids: tuple[int, ...] = tuple(tokenizer.eos_token_ids) if tokenizer else ()
        self.num_steps = 0
        self.tokens_generated = 0
        self.weights_desc = weights_desc  # how the weights are stored, for run summaries
        self.prefill_flops = 0  # matmul FLOPs of steps that computed prompt chunks, and their seconds: the
        self.prefill_s = 0.0  # measured rate that prices what a reused token would cost to recompute
        self._grammars: GrammarCompiler | None = None  # built at the first structured request

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | None, params: SamplingParams, *, prompt_token_ids: list[int] | None = None,
                    request_id: str | None = None, use_cache: bool = True, cache_salt: str | None = None,
                    verify: bool = False) -> str:
        ids = self._prompt_ids(prompt, prompt_token_ids)
        self._check_fits(len(ids), params.max_tokens, use_cache)
        params.check_vocab(self.model_config.vocab_size)
        seq_id = next(self._ids)
        request_id = request_id if request_id is not None else str(seq_id)
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use", param="request_id")
        seq = Sequence(seq_id, ids, params, use_cache=use_cache, cache_salt=cache_salt, record_logits=verify)
        if params.structured is not None:
            seq.constraint = self._grammar_compiler(params.structured.param).constraint(params.structured)
        tracker = TextTracker(self.tokenizer, seq) if self.tokenizer is not None else None
        req = _Request(request_id, prompt, seq, tracker, verify)
        self.requests[request_id] = req
        self._by_seq[seq_id] = req
        if use_cache:
            self.scheduler.add(seq)
        else:
            seq.status = SequenceStatus.RUNNING
            self._no_cache.append(seq)
        return request_id

    def _grammar_compiler(self, param: str) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None or not available():
                raise RequestError("structured output needs the model's tokenizer and the llguidance package "
                                   "(pip install llguidance)", param=param)
            self._grammars = GrammarCompiler(self.tokenizer.to_json(), list(self.eos_token_ids),
                                             self.model_config.vocab_size)
        return self._grammars

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if prompt is None or self.tokenizer is None:
                raise RequestError("a prompt (text or token ids) is required", param="prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        check_token_ids(ids, self.model_config.vocab_size, "prompt", "prompt token ids")
        return ids

    def _check_fits(self, n_prompt: int, max_tokens: int, use_cache: bool) -> None:
        limit = self.max_model_len
        if n_prompt >= limit:
            raise RequestError(f"the prompt has {n_prompt} tokens, but the context is {limit} tokens "
                               f"(at most {limit - 1} leave room for one new token)", param="prompt")
        if n_prompt + max_tokens > limit:
            raise RequestError(f"this model's context is {limit} tokens, but {n_prompt + max_tokens} were "
                               f"requested ({n_prompt} in the prompt, {max_tokens} in max_tokens)",
                               param="max_tokens")
        needed = self.block_tables.blocks_needed(n_prompt + max_tokens, self.scheduler.max_num_batched_tokens)
        if use_cache and needed > self.block_tables.num_blocks:
            raise RequestError(f"the request needs {needed} KV blocks but the KV cache holds "
                               f"{self.block_tables.num_blocks}; raise kv_cache_memory", param="max_tokens")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.seq.is_finished:
            return False
        self._finish(req, FinishReason.ABORT)
        self._release(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._no_cache) or self.scheduler.has_work()

    def stats(self) -> EngineStats:
        """A snapshot of the pool and the queues (call from the thread that steps the engine)."""
        b = self.block_tables.stats()
        spec = self.pool.spec
        requests = []
        tables = self.block_tables
        for req in self.requests.values():
            seq = req.seq
            held = tables.has_seq(seq.seq_id)
            requests.append(RequestBlocks(
                request_id=req.request_id, status=seq.status.value, blocks=tables.num_held(seq.seq_id) if held else 0,
                shared_blocks=tables.shared_blocks(seq.seq_id) if held else 0, tokens=len(seq.token_ids),
                computed_tokens=seq.num_computed_tokens, cached_tokens=seq.num_cached_tokens))
        return EngineStats(
            running=len(self.scheduler.running) + len(self._no_cache), waiting=len(self.scheduler.waiting),
            blocks_total=b.total, blocks_used=b.used, blocks_cached_free=b.cached_free, blocks_free=b.free,
            blocks_shared=b.shared, block_size=spec.block_size, kv_dtype=spec.dtype,
            bytes_per_token=spec.bytes_per_token, bytes_per_block=spec.bytes_per_block, pool_bytes=self.pool.nbytes,
            prefix_hit_tokens=b.hits, prefix_query_tokens=b.queries, prefix_evictions=b.evictions,
            tokens_generated=self.tokens_generated, preemptions=self.scheduler.num_preemptions,
            steps=self.num_steps, requests=requests, disk=self.disk.to_dict() if self.disk is not None else None)

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that produced a token or finished."""
        outputs: list[RequestOutput] = []
        if self._no_cache:
            outputs += self._step_no_cache()
        sched = self.scheduler.schedule()
        if sched.scheduled:
            outputs += self._step_cached(sched.scheduled)
        self.num_steps += 1
        return outputs

    def _step_cached(self, scheduled: list[ScheduledSeq]) -> list[RequestOutput]:
        now = time.perf_counter()
        flops = 0
        for s in scheduled:
            seq = s.seq
            seq.first_scheduled_time = seq.first_scheduled_time or now
            extra = len(prompt_rows(seq, s.start, s.num_new_tokens))  # (prompt log-probability rows)
            f = step_total(self.cached_flops_config, s.num_new_tokens, s.start + s.num_new_tokens,
                           int(s.needs_logits) + extra)
            seq.flops += f
            flops += f
        ok, logits, failed = self._forward_isolated(scheduled, self.runner.build_cached)
        if any(s.num_new_tokens > 1 for s in scheduled):
            self.prefill_flops += flops
            self.prefill_s += time.perf_counter() - now
        sampled = [s.seq for s in ok if s.needs_logits]  # (before committing: needs_logits reads progress)
        logits = split_rows([(s.seq, prompt_rows(s.seq, s.start, s.num_new_tokens), s.needs_logits) for s in ok],
                            logits)
        registered = []
        for s in ok:
            s.seq.num_computed_tokens += s.num_new_tokens
            registered += self.block_tables.commit(s.seq.seq_id, s.seq.token_ids, s.seq.num_computed_tokens)
        if self.disk is not None:
            self.disk.save(registered)
        outputs = [self._fail(s.seq, e) for s, e in failed]
        return outputs + self._append_tokens(sampled, logits)

    def _step_no_cache(self) -> list[RequestOutput]:
        seqs = list(self._no_cache)
        now = time.perf_counter()
        for seq in seqs:
            seq.first_scheduled_time = seq.first_scheduled_time or now
            n = len(seq.token_ids)
            seq.flops += step_total(self.model_config, n, n, 1 + len(prompt_rows(seq, 0, n)))
        ok, logits, failed = self._forward_isolated(seqs, self.runner.build_no_cache)
        logits = split_rows([(seq, prompt_rows(seq, 0, len(seq.token_ids)), True) for seq in ok], logits)
        return [self._fail(seq, e) for seq, e in failed] + self._append_tokens(ok, logits)

    def _forward_isolated(self, items: list[T], build: Callable[[list[T]], StepBatch]
                          ) -> tuple[list[T], torch.Tensor, list[tuple[T, Exception]]]:
        """One forward over `items`; if it raises, each item again on its own, so a failure that belongs to
        one sequence fails only that sequence. Returns (items that ran, their sampled rows' logits
        [rows, vocab], (item, error) pairs). Re-running is safe: a step writes K/V only at the positions
        it computes, and nothing was committed."""
        try:
            return items, self.runner.run(build(items)), []
        except Exception as e:  # noqa: BLE001 - attributed below
            if len(items) == 1:
                return [], torch.empty(0), [(items[0], e)]
        ok, parts, failed = [], [], []
        for item in items:
            try:
                parts.append(self.runner.run(build([item])))
                ok.append(item)
            except Exception as e:  # noqa: BLE001 - this item's own failure
                failed.append((item, e))
        return ok, torch.cat(parts) if parts else torch.empty(0), failed

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish one sequence whose step failed, with the error as its output; the rest of the step goes on."""
        req = self._by_seq[seq.seq_id]
        seq.error = f"{type(error).__name__}: {error}"
        self._finish(req, FinishReason.ERROR)
        out = self._output(req, delta_tokens=[])
        self._release(req)
        return out

    def _append_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        rows = [SampleRow(s.params, s.generator, s.prompt_token_ids, s.output_token_ids,
                          () if s.params.ignore_eos else self.eos_token_ids,
                          s.constraint.allowed() if s.constraint is not None else None) for s in seqs]
        samples = self.sampler(logits, rows) if seqs else []
        for i, (seq, sample) in enumerate(zip(seqs, samples, strict=True)):
            if seq.constraint is not None and isinstance(sample, Sample) and not self._ends(seq, sample.token_id):
                try:
                    seq.constraint.accept(sample.token_id)
                except Exception as e:  # noqa: BLE001 - this sequence's own failure
                    samples[i] = e
        now = time.perf_counter()
        outputs = []
        for i, (seq, sample) in enumerate(zip(seqs, samples, strict=True)):
            if isinstance(sample, Exception):
                outputs.append(self._fail(seq, sample))
                continue
            token = sample.token_id
            req = self._by_seq[seq.seq_id]
            if seq.record_logits:
                seq.step_logits.append(logits[i].clone())
            if sample.logprob is not None:
                seq.logprobs.append(sample.logprob)
            seq.token_ids.append(token)
            seq.token_times.append(now)
            seq.first_token_time = seq.first_token_time or now
            self.tokens_generated += 1
            reason = self._stop_reason(seq, token)
            hide = reason is FinishReason.STOP  # an end token's text is not part of the output
            if reason is None and seq.constraint is not None and seq.constraint.done:
                reason = FinishReason.STOP  # the grammar is complete: nothing more may follow
            if req.tracker is not None:
                req.tracker.add(token, hide=hide)
                if req.tracker.stopped:
                    reason = FinishReason.STOP
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, delta_tokens=[token]))
            if reason is not None:
                self._release(req)
        return outputs

    def _ends(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if self._ends(seq, token):
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        seq = req.seq
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()
        if req.tracker is not None:
            req.tracker.finish()
        seq.blocks_at_finish = self.block_tables.num_held(seq.seq_id) if self.block_tables.has_seq(seq.seq_id) else 0

    def _release(self, req: _Request) -> None:
        """Free the request's blocks and forget it (its final output has been built)."""
        seq = req.seq
        if seq.use_cache:
            self.scheduler.finish(seq)
        else:
            self._no_cache.remove(seq)
            seq.status = SequenceStatus.FINISHED
        del self.requests[req.request_id]
        del self._by_seq[seq.seq_id]

    # -- outputs ----------------------------------------------------------------------------------
    def _output(self, req: _Request, delta_tokens: list[int]) -> RequestOutput:
        seq = req.seq
        finished = seq.finish_reason is not None
        tracker = req.tracker
        out = RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=tracker.text if tracker else "",
            token_ids=list(seq.output_token_ids),
            delta_text=tracker.take_delta(finished) if tracker else "",
            delta_token_ids=delta_tokens,
            finished=finished,
            finish_reason=seq.finish_reason.value if finished else None,
            error=seq.error,
        )
        if seq.params.logprobs is not None:
            out.logprobs = list(seq.logprobs)
            out.delta_logprobs = seq.logprobs[len(seq.logprobs) - len(delta_tokens):] if delta_tokens else []
        if seq.params.prompt_logprobs is not None:
            out.prompt_logprobs = [None, *seq.prompt_logprobs]
        if finished:
            out.metrics = self._metrics(seq)
            if req.verify:
                out.verify = self.verify(seq)
        return out

    def _metrics(self, seq: Sequence) -> RequestMetrics:
        n_out = seq.num_output_tokens
        ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time else None
        decode = None
        if n_out > 1 and seq.finish_time and seq.first_token_time and seq.finish_time > seq.first_token_time:
            decode = (n_out - 1) / (seq.token_times[-1] - seq.first_token_time)
        blocks = seq.blocks_at_finish
        tokens_held = seq.num_computed_tokens if seq.use_cache else 0
        _, no_cache = request_flops(self.model_config, seq.num_prompt_tokens, n_out)
        memory_end = seq.num_cached_tokens - seq.num_disk_tokens
        reuse_memory = span_flops(self.cached_flops_config, 0, memory_end)
        reuse_disk = span_flops(self.cached_flops_config, memory_end, seq.num_cached_tokens)
        rate = self.prefill_flops / self.prefill_s if self.prefill_s > 0 else None
        return RequestMetrics(
            use_cache=seq.use_cache,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=n_out,
            cached_tokens=seq.num_cached_tokens,
            computed_prompt_tokens=seq.num_prompt_tokens - seq.num_cached_tokens,
            miss_reason=seq.miss_reason,
            blocks_held=blocks,
            kv_cache_bytes=int(self.pool.spec.bytes_for_sequence(tokens_held)),
            ttft_s=ttft,
            decode_tokens_per_s=decode,
            total_s=(seq.finish_time or time.perf_counter()) - seq.arrival_time,
            queue_s=(seq.first_scheduled_time - seq.arrival_time) if seq.first_scheduled_time else None,
            num_preemptions=seq.num_preemptions,
            flops=seq.flops,
            flops_no_cache=no_cache,
            disk_tokens=seq.num_disk_tokens,
            disk_bytes_read=seq.disk_bytes_read,
            disk_load_s=seq.disk_load_s,
            reuse_flops_memory=reuse_memory,
            reuse_flops_disk=reuse_disk,
            recompute_s=(reuse_memory + reuse_disk) / rate if rate else None,
            prompt_logprobs_flops=self._prompt_logprobs_flops(seq),
        )

    def _prompt_logprobs_flops(self, seq: Sequence) -> int:
        """The LM head over the prompt rows whose log-probabilities were reported (already in seq.flops)."""
        rows = len(seq.prompt_logprobs)
        return step_flops(self.model_config, rows, rows, lm_head_tokens=rows).lm_head if rows else 0

    def verify(self, seq: Sequence) -> VerifyReport:
        """Recompute the finished request with no cache at all and compare every sampled step's logits."""
        n_steps = len(seq.step_logits)
        tokens = seq.token_ids[: seq.num_prompt_tokens + n_steps - 1]
        ref = self.runner.full_logits_no_cache(tokens, seq.num_prompt_tokens - 1)  # [n_steps, vocab]
        got = torch.stack(seq.step_logits)  # [n_steps, vocab]
        diff = (ref - got).abs().max().item() if n_steps else 0.0
        outputs = seq.output_token_ids
        first, margin = None, None
        for i in range(n_steps):
            if seq.params.greedy and int(ref[i].argmax()) != outputs[i]:
                first, margin = i, float(ref[i].max() - ref[i, outputs[i]])
                break
        seq.step_logits.clear()
        return VerifyReport(tokens_checked=n_steps, max_abs_logit_diff=diff, first_divergence=first,
                            tolerance=VERIFY_TOLERANCE.get(self.dtype, 0.5), divergence_margin=margin)
