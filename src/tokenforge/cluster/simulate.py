"""`tokenforge bench simulate`: a discrete-event model of R replicas, to compare routers and prefill/decode
disaggregation at scales one machine cannot hold.

Each simulated replica batches like the real scheduler (running requests first, one token each or their
next prompt chunk, then waiting ones while the token budget, sequence slots and KV blocks last) and
keeps a prefix cache of chained block keys with LRU eviction, whose store/evict events feed the very
`KVIndex` and routers of `router.py`. A step costs

    a + b x prefill tokens + c x decoding requests + d x context tokens the decodes attend to (per 1,000)
      + e x (query, key) pairs the prefill chunks attend to (per 1,000,000)

seconds, with a..e fitted by least squares from the steps of a real engine (`fit_cost_model`, run by
`--fit`), or from the steps the replicas of a real serving run logged (`fit_from_step_logs`, run by
`--fit-from`: their times include what shared the machine with them). With prefill/decode roles a long
prompt's first token comes from a prefill replica, its blocks reach the decode replica after
`latency + bytes / bandwidth`, and decoding starts there with them cached.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field

from tokenforge.cluster.messages import KVEvents
from tokenforge.cluster.router import KVIndex, ReplicaView, make_router
from tokenforge.kv.block_hash import kv_namespace, prefix_keys


@dataclass(frozen=True)
class CostModel:
    a: float  # seconds per step
    b: float  # per prefill token
    c: float  # per decoding request
    d: float  # per 1,000 context tokens attended by decodes
    e: float = 0.0  # per 1,000,000 (query, key) pairs of prefill attention: a chunk after a long prefix costs more
    source: str = ""

    def step_seconds(self, prefill_tokens: int, num_decodes: int, context_tokens: int,
                     prefill_pairs: int = 0) -> float:
        return (self.a + self.b * prefill_tokens + self.c * num_decodes + self.d * context_tokens / 1000
                + self.e * prefill_pairs / 1e6)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> CostModel:
        with open(path) as f:
            return cls(**json.load(f))


@dataclass
class SimConfig:
    num_replicas: int = 2
    router: str = "kv-aware"
    num_prefill: int = 0  # > 0: prefill/decode roles (the rest decode)
    pd_threshold: int = 256
    block_size: int = 16
    num_blocks: int = 4096  # KV blocks per replica
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    bytes_per_block: int = 0  # for transfer times (0: transfers are free)
    transfer_bandwidth: float = 5e9  # bytes/s
    transfer_latency: float = 0.002  # seconds per hand-off
    overhead: float = 0.0  # seconds added to each request's first token (HTTP, routing, Ray)


@dataclass
class SimRequest:
    arrival: float
    prompt: list[int]
    output_len: int
    keys: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    num_output: int = 0
    blocks: int = 0
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_cached: int = 0
    prefill_only: bool = False  # on a prefill replica: stop after the first token and hand off
    resumed: SimRequest | None = None  # where it decodes after a hand-off
    shared_blocks: int = 0  # prompt blocks the router expected the chosen replica to hold


class SimReplica:
    def __init__(self, replica_id: int, role: str, cfg: SimConfig, cost: CostModel):
        self.replica_id = replica_id
        self.role = role
        self.cfg = cfg
        self.cost = cost
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.cache: OrderedDict[bytes, None] = OrderedDict()  # cached keys, least recently used first
        self.pinned: dict[bytes, int] = {}  # keys held by live requests
        self.used_blocks = 0
        self.busy = False
        self.seq = 0
        self.stored: list[bytes] = []
        self.evicted: list[bytes] = []
        self.queried = self.hit = 0

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def active_blocks(self) -> int:
        """Blocks held or about to be held, a shared cached prefix counted once (as the client estimates)."""
        bs = self.cfg.block_size
        return sum(r.blocks - r.num_cached // bs for r in self.running) + sum(
            _blocks(r, bs) - r.shared_blocks for r in self.waiting)

    def events(self) -> KVEvents:
        self.seq += 1
        events = KVEvents(self.seq, self.stored, self.evicted)
        self.stored, self.evicted = [], []
        return events

    def insert(self, keys: list[bytes]) -> None:
        """Cache these keys (a computed or imported prefix), evicting unpinned LRU keys beyond capacity."""
        for key in keys:
            if key in self.cache:
                self.cache.move_to_end(key)
                continue
            self.cache[key] = None
            self.stored.append(key)
        # cached keys live in free blocks, except those live requests hold (counted in used_blocks)
        capacity = self.cfg.num_blocks - self.used_blocks + len(self.pinned)
        while len(self.cache) > max(capacity, 0):
            victim = next((k for k in self.cache if k not in self.pinned), None)
            if victim is None:
                break
            del self.cache[victim]
            self.evicted.append(victim)

    def plan_step(self) -> tuple[float, list[tuple[SimRequest, int]]]:
        """The next step's work, as (request, tokens) pairs, and its cost in seconds."""
        cfg, budget, work = self.cfg, self.cfg.max_num_batched_tokens, []
        prefill = decodes = context = pairs = 0
        for req in self.running:
            if budget <= 0:
                break
            todo = len(req.prompt) - req.num_computed
            n = min(todo, budget) if todo > 0 else 1
            work.append((req, n))
            budget -= n
            if todo > 0:
                prefill += n
                pairs += n * (req.num_computed + n // 2)
            else:
                decodes += 1
                context += len(req.prompt) + req.num_output
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            need = _blocks(req, cfg.block_size)
            if self.used_blocks + need > cfg.num_blocks and self.running:
                break
            self.waiting.popleft()
            self._admit(req, need)
            n = min(len(req.prompt) - req.num_computed, budget)
            work.append((req, n))
            budget -= n
            prefill += n
            pairs += n * (req.num_computed + n // 2)
        return self.cost.step_seconds(prefill, decodes, context, pairs), work

    def _admit(self, req: SimRequest, need: int) -> None:
        num_keys = (len(req.prompt) - 1) // self.cfg.block_size
        cached = 0
        for key in req.keys[:num_keys]:
            if key not in self.cache:
                break
            self.cache.move_to_end(key)
            cached += 1
        req.num_computed = req.num_cached = cached * self.cfg.block_size
        self.queried += len(req.prompt)
        self.hit += req.num_computed
        req.blocks = need
        self.used_blocks += need
        for key in req.keys:
            self.pinned[key] = self.pinned.get(key, 0) + 1
        self.running.append(req)

    def release(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.used_blocks -= req.blocks
        for key in req.keys:
            self.pinned[key] -= 1
            if not self.pinned[key]:
                del self.pinned[key]


def _blocks(req: SimRequest, block_size: int) -> int:
    return -(-(len(req.prompt) + req.output_len) // block_size)


class Simulation:
    """Replays (arrival, prompt, output length) through the replicas; `run` returns the figures."""

    def __init__(self, cfg: SimConfig, cost: CostModel):
        self.cfg = cfg
        roles = ["prefill"] * cfg.num_prefill + ["decode" if cfg.num_prefill else "mixed"] * (
            cfg.num_replicas - cfg.num_prefill)
        self.replicas = [SimReplica(i, role, cfg, cost) for i, role in enumerate(roles)]
        self.index = KVIndex(ttl=10.0)
        self.router = make_router(cfg.router, self.index)
        self._events: list = []
        self._order = itertools.count()
        self.now = 0.0
        self.transfers = 0

    def _at(self, when: float, kind: str, payload) -> None:
        heapq.heappush(self._events, (when, next(self._order), kind, payload))

    def run(self, trace: list[tuple[float, list[int], int]]) -> dict:
        namespace = kv_namespace("simulated", "float32", self.cfg.block_size)
        requests = []
        for arrival, prompt, output_len in trace:
            req = SimRequest(arrival, prompt, output_len, prefix_keys(namespace, prompt, self.cfg.block_size))
            requests.append(req)
            self._at(arrival, "arrive", req)
        started = time.perf_counter()
        while self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            if kind == "arrive":
                self._route(payload, "prefill" if self._disaggregate(payload) else "decode")
            elif kind == "step":
                self._finish_step(*payload)
            else:  # "handoff": the blocks have arrived at the decode replica
                self._land(*payload)
        return self._figures(requests, time.perf_counter() - started)

    def _disaggregate(self, req: SimRequest) -> bool:
        return self.cfg.num_prefill > 0 and req.num_output == 0 and len(req.prompt) >= self.cfg.pd_threshold

    def _route(self, req: SimRequest, role: str) -> SimReplica:
        pool = [r for r in self.replicas if r.role == role or r.role == "mixed"]
        views = [ReplicaView(r.replica_id, r.num_requests, r.active_blocks()) for r in pool]
        num_keys = (len(req.prompt) - 1) // self.cfg.block_size
        replica = self.replicas[self.router.choose(views, req.keys[:num_keys], self.now)]
        req.shared_blocks = min(self.index.overlap(replica.replica_id, req.keys[:num_keys], self.now),
                                sum(1 for k in req.keys[:num_keys] if k in replica.cache))
        req.prefill_only = role == "prefill"
        replica.waiting.append(req)
        self._kick(replica)
        return replica

    def _kick(self, replica: SimReplica) -> None:
        if replica.busy or not replica.num_requests:
            return
        seconds, work = replica.plan_step()
        if not work:
            return
        replica.busy = True
        self._at(self.now + seconds, "step", (replica, work))

    def _finish_step(self, replica: SimReplica, work: list[tuple[SimRequest, int]]) -> None:
        replica.busy = False
        bs = self.cfg.block_size
        for req, n in work:
            prefilling = req.num_computed < len(req.prompt)
            req.num_computed += n
            if prefilling:
                replica.insert(req.keys[:min(req.num_computed, len(req.prompt)) // bs])
                if req.num_computed < len(req.prompt):
                    continue
            self._emit(req)
            if req.prefill_only and req.num_output < req.output_len:
                replica.release(req)
                self._hand_off(req)
            elif req.num_output >= req.output_len:
                replica.release(req)
        self.index.apply(replica.replica_id, replica.events())
        self._kick(replica)

    def _emit(self, req: SimRequest) -> None:
        if req.first_token is None:
            req.first_token = self.now + self.cfg.overhead
        req.token_times.append(self.now)
        req.num_output += 1

    def _hand_off(self, req: SimRequest) -> None:
        cfg = self.cfg
        num_blocks = len(req.prompt) // cfg.block_size
        seconds = cfg.transfer_latency + num_blocks * cfg.bytes_per_block / cfg.transfer_bandwidth
        self.transfers += 1
        self._at(self.now + seconds, "handoff", (req, num_blocks))

    def _land(self, req: SimRequest, num_blocks: int) -> None:
        """Resume on a decode replica with the prompt + first token, the shipped blocks in its cache."""
        resumed = SimRequest(req.arrival, req.prompt + [0], req.output_len - 1, req.keys)
        resumed.first_token = req.first_token
        decode = self._route(resumed, "decode")
        decode.insert(req.keys[:num_blocks])
        self.index.apply(decode.replica_id, decode.events())
        req.resumed = resumed

    def _figures(self, requests: list[SimRequest], wall: float) -> dict:
        ttft, itl, last = [], [], 0.0
        tokens = 0
        for req in requests:
            times = _all_times(req)
            ttft.append(req.first_token - req.arrival)
            itl += [b - a for a, b in zip(times, times[1:])]
            last = max(last, times[-1])
            tokens += len(times)
        queried = sum(r.queried for r in self.replicas)
        hits = sum(r.hit for r in self.replicas)
        first = min(r.arrival for r in requests)
        return {"requests": len(requests), "replicas": len(self.replicas), "router": self.cfg.router,
                "prefill_replicas": self.cfg.num_prefill, "duration_s": round(last - first, 3),
                "output_tok_s": round(tokens / max(last - first, 1e-9), 1),
                "ttft_ms": _dist(ttft), "itl_ms": _dist(itl),
                "prefix_hit_rate": round(hits / queried, 4) if queried else 0.0,
                "pd_transfers": self.transfers, "simulated_in_s": round(wall, 2)}


def _all_times(req: SimRequest) -> list[float]:
    return req.token_times + (_all_times(req.resumed) if req.resumed is not None else [])


def _dist(values: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {"median": None, "p90": None, "p99": None}

    def q(p):
        return round(ms[min(len(ms) - 1, int(p / 100 * (len(ms) - 1) + 0.5))], 2)

    return {"median": q(50), "p90": q(90), "p99": q(99)}


def make_trace(requests, rate: float, seed: int, burstiness: float = 1.0) -> list[tuple[float, list[int], int]]:
    """`bench serve`'s requests and arrival gaps, so a simulated run sees the measured run's workload."""
    from tokenforge.bench.serve import arrival_delays

    delays = arrival_delays(len(requests), rate, burstiness, seed)
    trace, now = [], 0.0
    for req, delay in zip(requests, delays, strict=True):
        now += delay
        trace.append((now, req.prompt, req.output_len))
    return trace


def sharegpt_trace(path: str, num: int, rate: float, seed: int, tokenizer=None) -> list[tuple[float, list[int], int]]:
    """Conversations from a ShareGPT JSON file: the first human turn is the prompt, the first reply's
    length the output length (tokenized with `tokenizer`, or about 4 characters a token without one)."""
    with open(path) as f:
        data = json.load(f)
    rng = random.Random(seed)
    rng.shuffle(data)
    pairs = []
    for conv in data:
        turns = conv.get("conversations", [])
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
        if len(pairs) == num:
            break

    def ids(text: str) -> list[int]:
        if tokenizer is not None:
            return tokenizer.encode(text)
        return [hash(word) % 30000 + 3 for word in text.split()] or [3]  # a stand-in, same text same ids

    from tokenforge.bench.serve import ServeRequest

    requests = [ServeRequest(ids(p)[:4096], max(1, len(ids(r)))) for p, r in pairs]
    return make_trace(requests, rate, seed)


def fit_cost_model(model: str, threads: int, kv_cache_memory: str = "1GiB", seed: int = 0,
                   num_requests: int = 48, concurrent: int = 1) -> CostModel:
    """Time a real engine's steps over a mixed workload and fit the step cost by least squares.

    `concurrent` > 1 runs that many engines at once, each in its own process with `threads` threads (as
    replicas on one machine run), and fits their pooled steps: the costs then include what the replicas do
    to each other (shared cores, memory bandwidth, caches), which one engine timed alone does not see."""
    if concurrent <= 1:
        rows, times = _step_samples(model, threads, kv_cache_memory, seed, num_requests)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(concurrent, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_step_samples, [model] * concurrent, [threads] * concurrent,
                                  [kv_cache_memory] * concurrent, [seed + i for i in range(concurrent)],
                                  [num_requests] * concurrent))
        rows = [r for part, _ in parts for r in part]
        times = [t for _, part in parts for t in part]
    where = f", {concurrent} engines at once" if concurrent > 1 else ""
    return _least_squares(rows, times, f"{model}, {threads} threads{where}, {len(times)} steps")


def _least_squares(rows: list[list[float]], times: list[float], source: str) -> CostModel:
    """Least squares with every coefficient >= 0: a term whose coefficient comes out negative is dropped
    and the rest refitted, until none is. (Clamping after one unconstrained fit is wrong where terms move
    together, as decodes and their context do: a negative per-decode cost offset by a large per-context
    one would become a large per-decode cost on its own.)"""
    import numpy as np

    if len(times) < 5:
        raise ValueError(f"{len(times)} steps are too few to fit a step cost ({source})")
    x, y = np.array(rows), np.array(times)
    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        fit = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (fit >= 0).all():
            coef[keep] = fit
            break
        del keep[int(np.argmin(fit))]
    a, b, c, d, e = (float(v) for v in coef)
    return CostModel(a, b, c, d * 1000, e * 1e6, source=source)


def fit_from_step_logs(paths: list[str]) -> CostModel:
    """The step cost fitted from engines' `--step-log` files (or folders of them): the steps of a real serving
    run, timed where they ran. A step that left work behind costs until the next step's start (its cycle:
    the step plus the stepping loop's hand-over, which a served token waits for too); the last step before
    the engine went idle costs its own time. Each file's first step (a warm-up) is left out."""
    from pathlib import Path

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"no step logs at {', '.join(missing)}: no such file or folder")
    files = [f for p in paths for f in (sorted(Path(p).glob("steps-*.jsonl")) if Path(p).is_dir() else [Path(p)])]
    if not files:
        raise ValueError(f"no step logs (steps-*.jsonl) in {', '.join(paths)}")
    rows, times = [], []
    for f in files:
        steps = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for step, after in zip(steps[1:], steps[2:] + [None]):
            took = after["start"] - step["start"] if step["busy"] and after is not None else step["s"]
            rows.append([1.0, step["prefill"], step["decodes"], step["context"], step["pairs"]])
            times.append(max(took, step["s"]))
    return _least_squares(rows, times, f"step logs of {len(files)} engines, {len(times)} steps")


def _step_samples(model: str, threads: int, kv_cache_memory: str, seed: int,
                  num_requests: int) -> tuple[list[list[float]], list[float]]:
    """One engine's steps over the fit workload: ([1, step shape...] per step, seconds per step)."""
    from tokenforge.bench.workload import ThroughputShape, make_workload
    from tokenforge.engine.engine import LLMEngine
    from tokenforge.sampling_params import SamplingParams

    engine = LLMEngine.from_args(model, num_threads=threads, kv_cache_memory=kv_cache_memory, max_num_seqs=16)
    longest = engine.model_config.max_model_len
    shape = ThroughputShape(num_requests, (16, min(512, longest // 2)), (8, min(96, longest // 4)), ())
    work = make_workload(shape, engine.model_config.vocab_size, seed)
    # every other prompt continues one shared prefix: chunks that start deep into a cached prefix tell the
    # attention term (e) apart from the per-token one (b), which fresh prompts alone confound
    shared = work.prompt_token_ids[0][:shape.prompt_len_range[1] * 3 // 4]
    prompts = [shared + p[:longest // 4] if i % 2 else p for i, p in enumerate(work.prompt_token_ids)]
    for i, (prompt, n) in enumerate(zip(prompts, work.output_lens, strict=True)):
        engine.add_request(f"fit-{i}", params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                           prompt_token_ids=prompt)
    rows, times = [], []
    while engine.has_unfinished_requests():
        shape = _next_step_shape(engine)
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
        rows.append([1.0, *shape])
    engine.close()
    return rows[1:], times[1:]  # the first step warms up


def _next_step_shape(engine) -> tuple[int, int, int, int]:
    """(prefill tokens, decoding requests, their context tokens, prefill attention pairs) the next step will
    run, read from the scheduler's queues the way its policy fills a step (an estimate: prefix hits and
    admissions refused for lack of blocks are not foreseen)."""
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill = decodes = context = pairs = 0
    for req in engine.scheduler.running:
        todo = req.num_tokens - req.num_computed_tokens
        if todo > 1:
            n = min(todo, budget)
            prefill += n
            pairs += n * (req.num_computed_tokens + n // 2)
        else:
            decodes += 1
            context += req.num_tokens
        budget -= min(max(todo, 1), budget)
    for req in engine.scheduler.waiting:
        if budget <= 0 or len(engine.scheduler.running) + decodes >= engine.config.scheduler.max_num_seqs:
            break
        n = min(req.num_tokens, budget)
        prefill += n
        pairs += n * n // 2
        budget -= n
    return prefill, decodes, context, pairs
