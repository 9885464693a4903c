"""The synchronous engine: validates and admits requests, runs scheduler -> runner -> scheduler each step,
detokenizes, applies stop strings and reports per-request outputs. It builds both sides of the KV tiers
(`kv/tiers.py` for the scheduler, `runner/kv_offload.py` for the runner) and `close()` flushes them."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from tokenforge.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    TierConfig,
    parse_dtype,
    parse_size,
)
from tokenforge.detokenizer import IncrementalDetokenizer
from tokenforge.engine.messages import CompletionOutput, RequestMetrics, RequestOutput, RunnerOutput
from tokenforge.engine.scheduler import Scheduler
from tokenforge.engine.step_log import StepLog
from tokenforge.kv import KVCacheManager
from tokenforge.kv.block_hash import BlockKey, kv_namespace, prefix_keys
from tokenforge.kv.disk_store import DiskStore
from tokenforge.kv.tiers import KVTiers
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant import draft_builder, quantized_copy
from tokenforge.models.registry import load_model
from tokenforge.models.weights import open_weights
from tokenforge.platform import configure_cpu, current_platform
from tokenforge.request import Request, RequestStatus
from tokenforge.runner.constraints import ConstraintStep
from tokenforge.runner.kv_cache import KVCache, kv_cache_dtype, num_blocks_for
from tokenforge.runner.kv_offload import KVOffloader
from tokenforge.runner.model_runner import ModelRunner
from tokenforge.sample.sampler import Sampler, TokenLogprobs
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec import NgramProposer, Proposer, SpecDecoder
from tokenforge.spec.draft import ModelProposer
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.state import RequestConstraints
from tokenforge.tokenizer import TokenizerWrapper


def build_engine_config(model: str, dtype: str = "float32", kv_cache_memory: int | str = "1GiB",
                        block_size: int = 16, enable_prefix_caching: bool = True, num_blocks: int | None = None,
                        max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                        max_model_len: int | None = None, num_threads: int | None = None,
                        seed: int = 0, speculative: SpeculativeConfig | str | None = None,
                        quantization: str = "none", quant_activations: str = "int8",
                        kv_offload_memory: int | str = 0,
                        kv_disk_dir: str | None = None, kv_disk_size: int | str = "50GiB",
                        kv_write_through: bool = False, kv_tenant_quota: int | str | None = None,
                        kv_tenant_quotas: dict[str, int | str] | None = None,
                        kv_load_policy: str = "auto", step_log_dir: str | None = None,
                        kv_cache_dtype: str = "auto") -> EngineConfig:
    tiers = TierConfig(
        offload_memory=parse_size(kv_offload_memory), disk_dir=kv_disk_dir, disk_size=parse_size(kv_disk_size),
        write_through=kv_write_through, load_policy=kv_load_policy,
        tenant_quota=None if kv_tenant_quota is None else parse_size(kv_tenant_quota),
        tenant_quotas=tuple((salt, parse_size(size)) for salt, size in (kv_tenant_quotas or {}).items()))
    return EngineConfig(
        model=ModelConfig.from_pretrained(model, max_model_len),
        dtype=parse_dtype(dtype),
        cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_size(kv_cache_memory),
                          enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks, dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs),
        num_threads=num_threads, seed=seed, quantization=quantization, quant_activations=quant_activations,
        tiers=tiers, step_log_dir=step_log_dir,
        speculative=SpeculativeConfig(method=speculative) if isinstance(speculative, str) else speculative)


class _Tracked:
    """What the engine keeps per live request beyond the scheduler's state."""

    def __init__(self, req: Request, detok: IncrementalDetokenizer):
        self.req = req
        self.detok = detok
        self.prompt_token_ids = tuple(req.prompt_token_ids)  # immutable, so every output may share it
        self.logprobs: list[TokenLogprobs] | None = [] if req.params.logprobs is not None else None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        configure_cpu(config.num_threads)
        torch.manual_seed(config.seed)
        self.platform = current_platform()
        mc = config.model
        self.model_config = mc
        self.tokenizer = TokenizerWrapper(mc.path)
        self.eos_token_ids = frozenset(mc.eos_token_ids) | self.tokenizer.eos_token_ids
        source = open_weights(mc.path)
        self.model = load_model(mc, config.dtype, config.quantization, source, self.platform,
                                config.quant_activations)
        cache_dtype = kv_cache_dtype(config.dtype, config.cache.dtype)
        block_size = config.cache.block_size
        self.num_blocks = num_blocks_for(mc, config.cache, cache_dtype)
        kv_cache = KVCache(mc, self.num_blocks, block_size, cache_dtype, self.platform.device)
        namespace = kv_namespace(source.fingerprint(), str(cache_dtype), block_size)
        tiers, offloader = self._tiers(kv_cache, namespace)
        self.kv = KVCacheManager(self.num_blocks, block_size, config.cache.enable_prefix_caching, namespace,
                                 tiers=tiers)
        self.spec = SpecDecoder(config.speculative, mc.max_model_len) if config.speculative else None
        # compiles each output constraint once: validation here and the runner's matchers share its cache
        self.grammar = GrammarCompiler(self.tokenizer.tokenizer, mc.vocab_size, self.eos_token_ids)
        constraints = ConstraintStep(self.grammar, self.tokenizer, mc.vocab_size,
                                     config.scheduler.max_num_seqs)
        self.runner = ModelRunner(self.model, kv_cache, Sampler(eos_token_ids=self.eos_token_ids),
                                  self.platform.attention_backend(), mc.sliding_window, constraints=constraints,
                                  offloader=offloader)
        if config.speculative:
            self.runner.proposer = self._proposer(config.speculative)
        self.scheduler = Scheduler(config.scheduler, self.kv, mc.max_model_len, self.spec)
        self._live: dict[str, _Tracked] = {}
        self.num_steps = 0
        self.step_log = StepLog(config.step_log_dir) if config.step_log_dir else None

    def _tiers(self, kv_cache: KVCache, namespace: bytes) -> tuple[KVTiers | None, KVOffloader | None]:
        """Both sides of the KV tiers, or (None, None) without --kv-offload-memory or prefix caching. The disk
        store lists what an earlier run left, so the scheduler's index starts with it."""
        cfg = self.config.tiers
        if not cfg.enabled or not self.config.cache.enable_prefix_caching:
            return None, None
        block_bytes = kv_cache.bytes_per_block
        disk = DiskStore(cfg.disk_dir, namespace, block_bytes) if cfg.disk_dir else None
        if disk is not None and not disk.usable:
            disk = None  # warned once by the store; host memory only
        tiers = KVTiers(cfg, block_bytes, kv_cache.block_size, disk.file_bytes if disk else 0,
                        disk.scan() if disk else None)
        return tiers, KVOffloader(kv_cache, tiers.host.capacity, disk)

    def close(self) -> None:
        """Stop the tier threads after writing the cached blocks (L1 and L2) to the disk tier, so a restart
        finds them.
        Call once no request is left; the engine takes no requests afterwards."""
        if self.step_log is not None:
            self.step_log.close()
            self.step_log = None
        offloader = self.runner.offloader
        if offloader is not None:
            self.runner.offloader = None
            offloader.close(self.kv.tiers.flush(self.kv.cached_blocks()))

    def _proposer(self, cfg: SpeculativeConfig) -> Proposer:
        mc, block_size = self.model_config, self.config.cache.block_size
        if cfg.tree and mc.sliding_window is not None:
            raise ConfigError("tree speculation is not supported with sliding-window attention; use a chain")
        width = cfg.tree_width if cfg.tree else None
        if cfg.method == "ngram":
            return NgramProposer(cfg.ngram_min, cfg.ngram_max, width)
        sampler = Sampler(eos_token_ids=self.eos_token_ids)
        attention = self.platform.attention_backend()
        if cfg.method == "self":  # the quantized copy has the target's layout, so it shares the target's cache
            if not any(isinstance(m, Linear) for m in self.model.modules()):
                raise ConfigError("self-speculation drafts with a quantized copy of dense weights, and this model's "
                                  "weights are already quantized; use --speculative ngram or draft")
            copy = quantized_copy(self.model, build=draft_builder(cfg.draft_quantization))
            runner = ModelRunner(copy, self.runner.kv_cache, sampler, attention,
                                 mc.sliding_window)
            return ModelProposer(runner, mc.max_model_len, cfg.draft_confidence, shares_target_cache=True,
                                 tree_width=width)
        dc = ModelConfig.from_pretrained(cfg.draft_model)
        draft_vocab = TokenizerWrapper(dc.path).tokenizer.get_vocab(with_added_tokens=True)
        if dc.vocab_size != mc.vocab_size or draft_vocab != self.tokenizer.tokenizer.get_vocab(with_added_tokens=True):
            raise ConfigError(f"draft model {cfg.draft_model!r} must share the target's tokenizer "
                              f"(vocabularies differ)")
        draft = load_model(dc, self.config.dtype, platform=self.platform)
        # a block of the draft's cache holds as many tokens as one of the target's, so the same count suffices
        cache_dtype = kv_cache_dtype(self.config.dtype, self.config.cache.dtype)
        cache = KVCache(dc, self.num_blocks, block_size, cache_dtype, self.platform.device)
        runner = ModelRunner(draft, cache, sampler, attention, dc.sliding_window)
        max_len = min(mc.max_model_len, dc.max_model_len)
        return ModelProposer(runner, max_len, cfg.draft_confidence, shares_target_cache=False,
                             num_blocks=self.num_blocks, tree_width=width)

    @classmethod
    def from_args(cls, model: str, **kwargs) -> LLMEngine:
        return cls(build_engine_config(model, **kwargs))

    # ---- intake -------------------------------------------------------------------------------------
    def make_request(self, req_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                     prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                     cache_salt: str | None = None, num_resumed_tokens: int = 0) -> Request:
        """Validate and build a request without queueing it (reads only config and tokenizer: any thread).

        Raises ValueError with a message fit for the user. Requests with different `cache_salt` never
        share cached KV blocks. `num_resumed_tokens`: the prompt's last tokens are output that another
        engine already streamed (failover, prefill hand-off); `params` then cover only what is left."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("give either a prompt string or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        max_tokens = self._check_lengths(prompt_token_ids, params)
        if not 0 <= num_resumed_tokens < len(prompt_token_ids):
            raise ValueError(f"num_resumed_tokens must be in [0, {len(prompt_token_ids)}), got {num_resumed_tokens}")
        if params.constrained:  # compile now: a bad schema, regex or grammar is the caller's error
            RequestConstraints.from_params(params, self.grammar, self.tokenizer)
        return Request(req_id, prompt_token_ids, params, max_tokens, self.eos_token_ids, prompt, arrival_time,
                       cache_salt, num_resumed_tokens)

    def add(self, req: Request) -> None:
        if req.req_id in self._live:
            raise ValueError(f"request id {req.req_id!r} is already in use")
        self._live[req.req_id] = _Tracked(req, self._detokenizer(req))
        self.scheduler.add_request(req)

    def _detokenizer(self, req: Request) -> IncrementalDetokenizer:
        """A resumed request's detokenizer first reads the tokens already streamed, one at a time as they were
        generated, so its held-back text and stop-string state are exactly those of the first engine."""
        n = req.num_resumed_tokens
        ids = req.prompt_token_ids
        detok = IncrementalDetokenizer(self.tokenizer.tokenizer, ids[:len(ids) - n], req.params)
        for token in ids[len(ids) - n:]:
            detok.step([token])
        return detok

    def add_request(self, req_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None) -> Request:
        """Validate and queue a request; raises ValueError with a message fit for the user."""
        req = self.make_request(req_id, prompt, params, prompt_token_ids, arrival_time, cache_salt)
        self.add(req)
        return req

    def _check_lengths(self, ids: list[int], params: SamplingParams) -> int:
        n, ctx, vocab = len(ids), self.model_config.max_model_len, self.model_config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if n >= ctx:
            raise ValueError(f"the prompt has {n} tokens, but this model's context length is {ctx}; "
                             f"shorten it to at most {ctx - 1} tokens")
        pool_tokens = self.num_blocks * self.config.cache.block_size
        if params.max_tokens is None:
            return min(ctx, pool_tokens) - n
        if n + params.max_tokens > ctx:
            raise ValueError(f"max_tokens={params.max_tokens} does not fit: the prompt has {n} tokens and the "
                             f"context length is {ctx}, so max_tokens can be at most {ctx - n}")
        if n + params.max_tokens > pool_tokens:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the whole KV "
                             f"cache ({pool_tokens} tokens); lower max_tokens or raise kv_cache_memory")
        return params.max_tokens

    def abort_request(self, req_ids: str | Iterable[str]) -> None:
        for req in self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED):
            self._live.pop(req.req_id, None)

    # ---- stepping -----------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """Work left: requests to run, or ended ones the runner has yet to drop (one more step does it)."""
        return self.scheduler.has_unfinished_requests() or self.scheduler.has_finished_requests()

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        updated = self.scheduler.update_from_output(sched, result)  # also resumes requests whose KV loaded
        if not sched.requests:
            return []
        self.num_steps += 1
        outputs = self._outputs(updated, result)
        if self.step_log is not None:
            took = time.perf_counter() - started
            self.step_log.record(sched, time.time() - took, took, self.scheduler.has_unfinished_requests())
        return outputs

    def _outputs(self, updated: list[tuple[Request, int]], result: RunnerOutput) -> list[RequestOutput]:
        outputs = []
        for req, num_new in updated:
            tracked = self._live[req.req_id]
            start = req.num_output_tokens - num_new
            new_text = self._detokenize(tracked, req, start, result.logprobs.get(req.req_id))
            outputs.append(self._output(tracked, new_text, req.output_token_ids[start:]))
            if req.status.finished:
                del self._live[req.req_id]
        return outputs

    def _detokenize(self, tracked: _Tracked, req: Request, start: int, logprobs: list[TokenLogprobs] | None) -> str:
        """Text of the tokens from output index `start` on; a stop string cuts the request (and its tokens)
        where it appears, just as if the tokens had arrived one step at a time."""
        new_text = ""
        for i in range(start, req.num_output_tokens):
            if tracked.logprobs is not None and logprobs is not None:
                tracked.logprobs.append(logprobs[i - start])
            last = i == req.num_output_tokens - 1
            if last and req.stopped_on_token:
                return new_text + tracked.detok.flush()  # the stop token itself is not part of the text
            stepped = tracked.detok.step([req.output_token_ids[i]])
            new_text += stepped.text_delta
            if stepped.stop_string is not None:
                if not last or not req.status.finished:  # a length stop on this very token wins
                    self._cut(req, i + 1, stepped.stop_string)
                return new_text
        if req.status.finished:
            new_text += tracked.detok.flush()
        return new_text

    def _cut(self, req: Request, num_output: int, stop_string: str) -> None:
        """End req on a stop string after its first num_output tokens; verified tokens past it are dropped."""
        del req.output_token_ids[num_output:]
        del req.all_token_ids[req.num_prompt_tokens + num_output:]
        req.stop_reason = stop_string
        if req.status.finished:  # a later token of the same step had already ended it
            req.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_requests(req.req_id, RequestStatus.FINISHED_STOPPED)

    def _output(self, tracked: _Tracked, new_text: str, new_ids: list[int]) -> RequestOutput:
        """A value: lists are copies (or immutable), never the request's own."""
        req = tracked.req
        finished = req.status.finished
        completion = CompletionOutput(
            index=0, text=tracked.detok.output_text, token_ids=list(req.output_token_ids), new_text=new_text,
            new_token_ids=new_ids, logprobs=None if tracked.logprobs is None else list(tracked.logprobs),
            finish_reason=req.status.value if finished else None,
            stop_reason=req.stop_reason if finished else None)
        metrics = RequestMetrics(req.arrival_time, req.first_token_time, req.finish_time, req.num_cached_tokens,
                                 req.num_preemptions)
        return RequestOutput(req.req_id, req.prompt, tracked.prompt_token_ids, [completion], finished, metrics)

    # ---- KV hand-off between engines ----------------------------------------------------------------
    def prefix_keys(self, token_ids: list[int], cache_salt: str | None = None) -> list[BlockKey]:
        """The keys of token_ids' full blocks in this engine's cache (the same in every engine of this model)."""
        return prefix_keys(self.kv.namespace, token_ids, self.kv.block_size, salt=cache_salt)

    def export_prefix(self, keys: list[BlockKey]) -> tuple[list[BlockKey], torch.Tensor]:
        """The K/V of the leading cached blocks among `keys` (stopping at the first one not cached), as one
        host tensor (`KVCache.read_blocks`), with their keys: a finished prefill shipped to a decode engine."""
        block_ids = []
        for key in keys:
            block_id = self.kv.pool.lookup(key)
            if block_id is None:
                break
            block_ids.append(block_id)
        return keys[:len(block_ids)], self.runner.kv_cache.read_blocks(block_ids)

    def import_prefix(self, keys: list[BlockKey], data: torch.Tensor) -> int:
        """Write blocks shipped by `export_prefix` into this cache and index them, so that a request with this
        prefix finds them cached and computes only the rest. Blocks already cached are kept; the chain is
        cut where free blocks run out. Returns how many blocks of the chain are now cached."""
        if not self.kv.enable_prefix_caching:
            raise ValueError("importing KV blocks needs prefix caching; start the engine without --no-prefix-caching")
        pool, held, todo = self.kv.pool, [], []
        for i, key in enumerate(keys):
            block_id = pool.lookup(key)
            if block_id is None:
                todo.append(i)
            else:
                pool.acquire(block_id)  # so that allocating the missing ones cannot evict it
                held.append(block_id)
        todo = todo[:pool.num_free_blocks]
        new_ids = pool.allocate(len(todo))
        self.runner.kv_cache.write_blocks(new_ids, data[todo])
        for i, block_id in zip(todo, new_ids, strict=True):
            pool.register(block_id, keys[i])
        pool.release(held + new_ids)
        num = 0
        while num < len(keys) and pool.lookup(keys[num]) is not None:
            num += 1
        return num

    # ---- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict:
        kv = self.kv
        return {
            "num_waiting": self.scheduler.num_waiting + self.scheduler.num_loading,
            "num_running": self.scheduler.num_running, "num_loading_kv": self.scheduler.num_loading,
            "kv_blocks_total": self.num_blocks, "kv_blocks_used": kv.num_used_blocks,
            "prefix_cache_queries": kv.prefix_queries, "prefix_cache_hits": kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "time": time.time(), **(self.spec.stats() if self.spec else {}),
            **({**kv.tiers.snapshot(), "kv_tier1_blocks": kv.pool.num_cached_blocks} if kv.tiers is not None else {}),
            **self.runner.constraints.stats(),
        }
