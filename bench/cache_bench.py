"""`python -m bench.cache_bench`: the answer cache and pre-generation under a Zipf-like FAQ question stream.

One fake upstream (its own process, TTFT 1.2 s) serves the whole run. The direct path (the
client straight to the upstream) is measured first, for reference. Then, for each mode
(cache and pre-generation off; cache on; cache and pre-generation on; the same with the
visitors split over two tenants), a fresh kefu stack replays the same seeded visitor stream:
each visitor opens a session and asks 1-3 questions in it, reading each answer for a while
before the next. The generator is described in bench/README.md ("Cache and pre-generation").

Results: a markdown table on stdout and bench/results/cache-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import opencc
from prometheus_client.parser import text_string_to_metric_families

from bench.__main__ import (
    MODEL,
    REPLY,
    RESULTS_DIR,
    BenchParams,
    _write,
    cpu_snapshot,
    fetch_json,
    start_stack,
    start_upstream,
    stop_process,
)
from bench.loadgen import LoadSpec, Target, _error_code, percentiles, run_load
from bench.processes import bench_work_dir
from bench.sse_reader import read_sse
from devtools.devstack.stack import REPO_ROOT, Stack
from devtools.mint_token import mint
from gateway.settings import DEFAULT_SYSTEM_PROMPT
from services.llm_worker.cache_key import cacheable_question, normalize_question
from services.llm_worker.plugin_api import ChatMessage, PluginContext

log = logging.getLogger("bench.cache")

FAQ_FILE = "shop_faq.json"
TENANTS = ("bench-a", "bench-b")
WARMUP_TENANT = "bench-warmup"
"""Warm-up turns go to their own tenant: their cache entries can never serve a measured turn."""
P95_GOAL_MS = 380.0
PRIOR_INDEX_OFFSET = 1_000_000

# ---------------------------------------------------------------- the question stream

LANGUAGES = ("zh", "en")
VARIANTS = ("verbatim", "punctuation", "width", "script", "polite")
VARIANT_WEIGHTS = (0.40, 0.15, 0.10, 0.10, 0.25)
"""`script`: traditional characters (zh) or upper/lower case (en); `polite`: "请问" / "Hi, " in front.
Only `polite` changes the normalised question (the cache key); the others fold away."""
TURN_WEIGHTS = {1: 0.40, 2: 0.35, 3: 0.25}
"""How many questions a visitor asks in their session."""
PERSONAL_TEMPLATES = {
    "zh": ("我的订单{n}到哪了？", "订单{n}什么时候发货", "帮我查一下订单{n}的物流", "订单号{n}，我想申请退款"),
    "en": ("Where is my order {n}?", "Has order {n} shipped yet?", "Please check the status of order #{n}",
           "I want a refund for order {n}"),
}
FREE_WORDINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # Wordings a visitor may use that are NOT phrasings in the FAQ (held out: the knowledge base never
    # saw them). The matcher decides, as it would for a real visitor, whether each is close enough to
    # its entry; several are not (e.g. "how fast do you ship" scores best on shipping-cost).
    "shipping-time": {"zh": ("一般几天能发货", "发货要多久"),
                      "en": ("how fast do you ship", "how many days until it ships")},
    "shipping-cost": {"zh": ("运费怎么算", "买多少钱可以包邮"),
                      "en": ("what does delivery cost", "do you have free shipping")},
    "shipping-international": {"zh": ("我在美国能买吗", "寄到日本可以吗"), "en": ("do you deliver to japan",)},
    "order-tracking": {"zh": ("快递单号在哪看", "包裹到哪里了"),
                       "en": ("where can i see my tracking number", "where is my parcel")},
    "order-change-address": {"zh": ("收货地址写错了能改吗",), "en": ("can i fix the address on my order",)},
    "order-cancel": {"zh": ("订单还能取消吗",), "en": ("can i still cancel my order",)},
    "returns-policy": {"zh": ("退货要怎么操作", "怎么申请退货"), "en": ("how do i send something back",)},
    "refund-time": {"zh": ("退款几天能到", "退的钱多久到账"), "en": ("how many days for my refund",)},
    "damaged-item": {"zh": ("东西收到是碎的",), "en": ("my cup arrived cracked",)},
    "payment-methods": {"zh": ("能用支付宝付款吗", "可以货到付款吗"),
                        "en": ("do you take paypal", "can i pay by apple pay")},
    "invoice": {"zh": ("能开个发票吗", "能开专票吗"), "en": ("can i get a receipt",)},
    "coupons": {"zh": ("有什么优惠吗", "有没有新人优惠券"),
                "en": ("any discounts right now", "do you have a welcome coupon")},
    "membership": {"zh": ("会员积分有什么用",), "en": ("what do members get",)},
    "account-password": {"zh": ("密码忘了",), "en": ("i lost my password",)},
    "tea-storage": {"zh": ("茶叶放冰箱可以吗",), "en": ("how do i keep tea fresh",)},
    "tea-shelf-life": {"zh": ("茶叶放多久会坏",), "en": ("how long does tea stay fresh",)},
    "brewing-green": {"zh": ("龙井怎么泡好喝",), "en": ("how do i make longjing",)},
    "brewing-puer": {"zh": ("普洱要泡几次",), "en": ("how many times can i steep pu-erh",)},
}
NOVEL_QUESTIONS = {
    # Questions the FAQ does not cover at all: the knowledge base hands them over, the LLM answers them.
    "zh": ("你们有实体店吗", "有茶艺课程吗", "你们招聘吗", "可以开直播带货吗", "茶叶可以做面膜吗",
           "能帮我推荐一款送长辈的茶吗", "你们和哪家快递合作", "茶具可以刻字吗", "有没有无糖的奶茶", "周末发货吗"),
    "en": ("Do you have a physical store?", "Do you run tea classes?", "Are you hiring?", "Do you sell coffee?",
           "Which tea would you recommend for my dad?", "Which courier do you use?", "Can you engrave a teapot?",
           "Do you ship on weekends?"),
}
_S2T = opencc.OpenCC("s2t")
_TRAILING_PUNCTUATION = "？?！!。.～~ "


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    visitors: int = 200
    seed: int = 20251125
    zipf_s: float = 1.1
    """Exponent of the Zipf law over FAQ entries (rank = order in the FAQ file) and over an entry's phrasings."""
    related_bias: float = 0.6
    """Chance that a visitor's next FAQ question is one of the previous entry's `related` entries."""
    personal_share: float = 0.10
    """Chance that a question is about the visitor's own order (a fresh order number: never reusable)."""
    free_share: float = 0.0
    """Chance that an FAQ question is worded in a way the FAQ does not list (FREE_WORDINGS), when its entry has one."""
    novel_share: float = 0.0
    """Chance that a question is one the FAQ does not cover at all (NOVEL_QUESTIONS, uniform)."""
    zh_share: float = 0.7
    """Chance that a visitor writes Chinese (else English); a visitor keeps one language."""
    think_s: tuple[float, float] = (1.5, 4.0)
    """Reading time after an answer before the visitor's next question, uniform in this range."""

    def __post_init__(self) -> None:
        if self.visitors < 1:
            raise ValueError(f"--visitors must be >= 1, got {self.visitors}")
        for name in ("related_bias", "personal_share", "zh_share", "free_share", "novel_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be within 0..1")
        if self.zipf_s < 0:
            raise ValueError(f"--zipf-s must be >= 0, got {self.zipf_s}")
        if not 0 <= self.think_s[0] <= self.think_s[1]:
            raise ValueError(f"--think-s must be 'min,max' with 0 <= min <= max, got {self.think_s}")


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    kind: str
    """`faq`, `novel` or `personal`."""
    language: str
    entry: str = ""
    """FAQ entry id (the entry the question was drawn from; for `personal`, empty)."""
    phrasing: int = -1
    """Index of the FAQ phrasing it was made from (0 = the entry's first, which pre-generation asks)."""
    variant: str = "verbatim"

    @property
    def key(self) -> str:
        """The question part of the worker's cache key."""
        return normalize_question(self.text)


@dataclass(frozen=True, slots=True)
class Visitor:
    index: int
    language: str
    questions: tuple[Question, ...]
    think_s: tuple[float, ...]
    """Pause after each answer but the last."""


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (rank ** s) for rank in range(1, n + 1)]


def _swap_width(text: str) -> str:
    """ASCII <-> full-width forms (NFKC folds them back)."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0x21 <= code <= 0x7E:
            out.append(chr(code + 0xFEE0))
        elif 0xFF01 <= code <= 0xFF5E:
            out.append(chr(code - 0xFEE0))
        elif ch == " ":
            out.append("\u3000")
        else:
            out.append(ch)
    return "".join(out)


def paraphrase(text: str, language: str, variant: str, rng: random.Random) -> str:
    """One of the simple surface variants of an FAQ phrasing (see VARIANTS)."""
    if variant == "punctuation":
        stripped = text.rstrip(_TRAILING_PUNCTUATION)
        if stripped != text:
            return stripped
        return text + rng.choice(("？", "?", "？？") if language == "zh" else ("?", "??", " ?"))
    if variant == "width":
        return _swap_width(text)
    if variant == "script":
        if language == "zh":
            traditional: str = _S2T.convert(text)  # opencc is untyped
            return traditional
        return text.upper() if rng.random() < 0.5 else text.lower()
    if variant == "polite":
        return ("请问" + text) if language == "zh" else ("Hi, " + text)
    return text


class WorkloadBuilder:
    """Seeded visitors over the FAQ document (`entries`: [{id, questions: {zh, en}, related}])."""

    def __init__(self, faq: Mapping[str, Any], spec: WorkloadSpec) -> None:
        self._spec = spec
        self._entries: dict[str, Mapping[str, Any]] = {e["id"]: e for e in faq["entries"]}
        self._ids: list[str] = [e["id"] for e in faq["entries"]]
        self._entry_weights = zipf_weights(len(self._ids), spec.zipf_s)
        self._rng = random.Random(spec.seed)

    def build(self) -> list[Visitor]:
        return [self._visitor(index) for index in range(self._spec.visitors)]

    def _visitor(self, index: int) -> Visitor:
        rng, spec = self._rng, self._spec
        language = "zh" if rng.random() < spec.zh_share else "en"
        turns = rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()))[0]
        questions: list[Question] = []
        previous: str | None = None
        asked: set[str] = set()
        for _ in range(turns):
            if rng.random() < spec.personal_share:
                template = rng.choice(PERSONAL_TEMPLATES[language])
                number = f"2025{rng.randrange(10 ** 8):08d}"
                questions.append(Question(template.format(n=number), "personal", language))
                continue
            # Draws only when a share is set, so the default stream stays what it was before these existed.
            if spec.novel_share and rng.random() < spec.novel_share:
                questions.append(Question(rng.choice(NOVEL_QUESTIONS[language]), "novel", language))
                continue
            entry = self._next_entry(previous, asked)
            previous = entry
            asked.add(entry)
            free = FREE_WORDINGS.get(entry, {}).get(language, ())
            if free and spec.free_share and rng.random() < spec.free_share:
                questions.append(Question(rng.choice(free), "faq", language, entry, -1, "free"))
                continue
            phrasings = self._entries[entry]["questions"][language]
            phrasing = rng.choices(range(len(phrasings)), weights=zipf_weights(len(phrasings), spec.zipf_s))[0]
            variant = rng.choices(VARIANTS, weights=VARIANT_WEIGHTS)[0]
            text = paraphrase(phrasings[phrasing], language, variant, rng)
            questions.append(Question(text, "faq", language, entry, phrasing, variant))
        think = tuple(round(rng.uniform(*spec.think_s), 3) for _ in questions[1:])
        return Visitor(index, language, tuple(questions), think)

    def _next_entry(self, previous: str | None, asked: set[str]) -> str:
        rng = self._rng
        if previous is not None and rng.random() < self._spec.related_bias:
            related: list[str] = [r for r in self._entries[previous]["related"] if r not in asked]
            if related:
                return rng.choice(related)
        for _ in range(20):  # a fresh topic: not one this visitor already asked about
            entry = rng.choices(self._ids, weights=self._entry_weights)[0]
            if entry not in asked:
                return entry
        return entry


def load_faq(plugins_dir: Path) -> dict[str, Any]:
    faq: dict[str, Any] = json.loads((plugins_dir / FAQ_FILE).read_text(encoding="utf-8"))
    return faq


# ---------------------------------------------------------------- what the worker may cache


class _Knower(Protocol):
    async def setup(self) -> None: ...

    def is_standalone(self, question: str) -> bool: ...

    def canonical_question(self, question: str) -> str | None: ...

    def suggest_next(self, question: str, limit: int = 3) -> list[str]: ...


async def load_knowledge_base(plugins_dir: Path) -> _Knower:
    """The knowledge-base plugin, loaded as the worker loads it, to predict which turns the worker may cache."""
    path = plugins_dir / "knowledge_base.py"
    name = "kefu_cache_bench_plugins.knowledge_base"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    provider: _Knower = module.plugin({"faq_file": FAQ_FILE}, PluginContext(plugins_dir))
    await provider.setup()
    return provider


def predicted_cacheable(visitor: Visitor, knower: _Knower) -> list[bool]:
    """Per question: does the worker's rule (services/llm_worker/cache_key.py) let it use the cache?"""
    out = []
    messages = [ChatMessage("system", DEFAULT_SYSTEM_PROMPT)]
    for question in visitor.questions:
        messages.append(ChatMessage("user", question.text))
        out.append(cacheable_question(messages, knower.is_standalone) is not None)
        messages.append(ChatMessage("assistant", REPLY))
    return out


def workload_stats(faq: Mapping[str, Any], visitors: Sequence[Visitor], cacheable: Sequence[Sequence[bool]],
                   tenants: int, knower: _Knower) -> dict[str, Any]:
    """Counts that bound what any cache can do on this stream."""
    # What pre-generation asks: the first phrasing of a related entry, in the visitor's language.
    pregen_keys = {(e["id"], lang): normalize_question(e["questions"][lang][0])
                   for e in faq["entries"] for lang in LANGUAGES}
    turns = [(v, q, c) for v, flags in zip(visitors, cacheable, strict=True)
             for q, c in zip(v.questions, flags, strict=True)]
    keys = [(v.index % tenants, q.key) for v, q, c in turns if c]
    # Every question the worker may ask pre-generation for (it asks after each cacheable turn).
    candidates = {(v.index % tenants, normalize_question(s)) for v, q, c in turns if c
                  for s in knower.suggest_next(q.text, 3)}
    pregen_shaped = sum(1 for _, q, c in turns if c and q.kind == "faq" and q.key == pregen_keys[q.entry, q.language])
    # The answer a cacheable turn can be served: its own wording's, or its canonical question's.
    canonical = {q.text: knower.canonical_question(q.text) for _, q, c in turns if c}
    slots = [(v.index % tenants, normalize_question(canonical[q.text] or q.text)) for v, q, c in turns if c]
    return {
        "visitors": len(visitors),
        "turns": len(turns),
        "faq_turns": sum(1 for _, q, _ in turns if q.kind == "faq"),
        "free_wording_turns": sum(1 for _, q, _ in turns if q.variant == "free"),
        "novel_turns": sum(1 for _, q, _ in turns if q.kind == "novel"),
        "personal_turns": sum(1 for _, q, _ in turns if q.kind == "personal"),
        "turns_per_visitor": dict(sorted(Counter(len(v.questions) for v in visitors).items())),
        "languages": dict(Counter(v.language for v in visitors)),
        "variants": dict(Counter(q.variant for _, q, _ in turns if q.kind == "faq")),
        "distinct_texts": len({q.text for _, q, _ in turns}),
        "distinct_keys": len({q.key for _, q, _ in turns}),
        "cacheable_turns": len(keys),
        "distinct_cacheable_keys": len(set(keys)),
        # With an unbounded cache and no pre-generation, every key misses once.
        "cache_only_ceiling": (len(keys) - len(set(keys))) / len(turns) if turns else 0.0,
        "cacheable_share": len(keys) / len(turns) if turns else 0.0,
        # With canonical keys: cacheable turns the knowledge base maps to an FAQ entry's first phrasing,
        # and what an unbounded cold cache could then answer (every answer slot misses once).
        "canonical_turns": sum(1 for text in (q.text for _, q, c in turns if c) if canonical[text]),
        "distinct_answer_slots": len(set(slots)),
        "canonical_cache_only_ceiling": (len(slots) - len(set(slots))) / len(turns) if turns else 0.0,
        # Cacheable FAQ turns worded (after normalisation) as pre-generation words them.
        "cacheable_pregen_shaped_turns": pregen_shaped,
        "pregen_candidates": len(candidates),
        "pregen_candidates_asked": len(candidates & set(keys)),
        "entry_counts": dict(Counter(q.entry for _, q, _ in turns if q.kind == "faq").most_common()),
    }


# ---------------------------------------------------------------- driving the visitors


@dataclass(frozen=True, slots=True)
class Turn:
    """One question as the client saw it; times in seconds from just before its POST."""

    visitor: int
    tenant: str
    index: int
    started_s: float
    """When its POST left, seconds from the start of the stream."""
    kind: str
    entry: str
    variant: str
    text: str
    ok: bool
    ttft_s: float | None
    total_s: float
    cached: bool
    error: str | None = None
    predicted_cacheable: bool = False


class Principals:
    """One JWT per (tenant, visitor), minted outside the timed part."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._tokens: dict[tuple[str, int], str] = {}

    def token(self, tenant: str, visitor: int) -> str:
        if (tenant, visitor) not in self._tokens:
            self._tokens[tenant, visitor] = mint(self._secret, tenant=tenant, subject=f"cache-bench-{visitor}",
                                                 role="visitor", ttl_s=6 * 3600)
        return self._tokens[tenant, visitor]


@dataclass(frozen=True, slots=True)
class _Answer:
    ok: bool
    ttft_s: float | None
    total_s: float
    cached: bool = False
    session_id: str = ""
    error: str | None = None


async def ask(http: aiohttp.ClientSession, url: str, token: str, message: str, session_id: str) -> _Answer:
    """POST /v1/chat (stream) and read it to the end: TTFT is the first non-empty delta."""
    body: dict[str, Any] = {"message": message, "stream": True}
    if session_id:
        body["session_id"] = session_id
    started = time.perf_counter()
    ttft: float | None = None
    try:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status != 200:
                return _Answer(False, None, time.perf_counter() - started, error=await _error_code(response))
            async for event in read_sse(response):
                if event.event == "session":
                    session_id = str(event.json().get("session_id") or session_id)
                elif event.event == "message":
                    if ttft is None and event.json().get("delta"):
                        ttft = time.perf_counter() - started
                elif event.event == "done":
                    total = time.perf_counter() - started
                    await response.read()
                    return _Answer(True, ttft, total, bool(event.json().get("cached")), session_id)
                elif event.event == "error":
                    return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                                   error=str(event.json().get("code") or "error_event"))
            return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                           error="incomplete_stream")
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                       error=type(error).__name__)


async def run_visitor(http: aiohttp.ClientSession, url: str, principals: Principals, tenant: str,
                      visitor: Visitor, cacheable: Sequence[bool], think_scale: float, origin: float) -> list[Turn]:
    token = principals.token(tenant, visitor.index)
    session_id = ""
    turns: list[Turn] = []
    for index, question in enumerate(visitor.questions):
        if index:
            await asyncio.sleep(visitor.think_s[index - 1] * think_scale)
        started = time.perf_counter() - origin
        answer = await ask(http, url, token, question.text, session_id)
        turns.append(Turn(visitor.index, tenant, index, round(started, 3), question.kind, question.entry,
                          question.variant, question.text, answer.ok, answer.ttft_s, answer.total_s, answer.cached,
                          answer.error, cacheable[index]))
        if not answer.ok or not answer.session_id:
            break  # the rest of this visitor's session cannot continue; counted as not sent
        session_id = answer.session_id
    return turns


async def run_stream(edge_url: str, visitors: Sequence[Visitor], cacheable: Sequence[Sequence[bool]],
                     tenants: Sequence[str], principals: Principals, concurrency: int, timeout_s: float,
                     metrics_url: str, think_scale: float = 1.0) -> tuple[list[Turn], float, list[float]]:
    """`concurrency` visitors at a time, in visitor order; returns every turn, the wall time and the
    worker's live upstream streams (`kefu_active_streams`) sampled every second meanwhile."""
    url = f"{edge_url}/v1/chat"
    pending = iter(zip(visitors, cacheable, strict=True))
    connector = aiohttp.TCPConnector(limit=0)
    turns: list[Turn] = []

    async def slot() -> None:
        for visitor, flags in pending:  # one event loop: sharing the iterator needs no lock
            tenant = tenants[visitor.index % len(tenants)]
            turns.extend(await run_visitor(http, url, principals, tenant, visitor, flags, think_scale, started))

    async def sample_streams() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                async with http.get(metrics_url) as reply:
                    text = await reply.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            found = re.search(r"^kefu_active_streams (\S+)$", text, re.MULTILINE)
            if found:
                streams.append(float(found.group(1)))

    streams: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        started = time.perf_counter()
        sampler = asyncio.create_task(sample_streams())
        try:
            await asyncio.gather(*(slot() for _ in range(concurrency)))
        finally:
            sampler.cancel()
        duration = time.perf_counter() - started
    return sorted(turns, key=lambda t: (t.visitor, t.index)), duration, streams


async def warm_up(edge_url: str, principals: Principals, count: int, timeout_s: float) -> None:
    """Connections, tokenizers and code paths warm, in a tenant of its own; questions that match no
    FAQ entry, so the knowledge base suggests nothing to pre-generate."""
    if count < 1:
        return
    url = f"{edge_url}/v1/chat"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        answers = await asyncio.gather(*(
            ask(http, url, principals.token(WARMUP_TENANT, 100_000 + n), f"warm-up {n} zqxj {secrets.token_hex(4)}", "")
            for n in range(count)))
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed}")


# ---------------------------------------------------------------- stacks, metrics, upstream


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    cache: bool
    pregen: bool
    tenants: int = 1


MODES = {
    "off": Mode("off", cache=False, pregen=False),
    "cache": Mode("cache", cache=True, pregen=False),
    "cache+pregen": Mode("cache+pregen", cache=True, pregen=True),
    "2-tenants": Mode("cache+pregen, 2 tenants", cache=True, pregen=True, tenants=2),
}


def start_mode_stack(work_dir: Path, upstream_url: str, secret: str, mode: Mode,
                     worker_env: Mapping[str, str]) -> Stack:
    """bench/__main__'s stack with the mode's cache switches, and plugins whose routes name the sample FAQ:
    the knowledge base then knows the tea shop's common questions for every tenant (the bundled routes
    answer each tenant from its own documents, and these tenants have none)."""
    plugins = shutil.copytree(REPO_ROOT / "plugins", work_dir / "plugins",
                              ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    routes = plugins / "routes.toml"
    routes.write_text(routes.read_text().replace("settings]\n", 'settings]\nfaq_file = "shop_faq.json"\n'))
    return start_stack(work_dir, upstream_url, secret, {
        "KEFU_CACHE_ENABLED": "1" if mode.cache else "0",
        "KEFU_PREGEN_ENABLED": "1" if mode.pregen else "0",
        "KEFU_PLUGINS_DIR": str(plugins),
        **worker_env,
    })


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed `name{label=value,...}` (labels sorted)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def cache_figures(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """Deltas of the worker's cache and pre-generation counters over the measured stream."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    local_hit = delta("kefu_cache_requests_total{result=hit,tier=local}")
    local_miss = delta("kefu_cache_requests_total{result=miss,tier=local}")
    shared_hit = delta("kefu_cache_requests_total{result=hit,tier=shared}")
    shared_miss = delta("kefu_cache_requests_total{result=miss,tier=shared}")
    lookups = local_hit + local_miss  # every lookup counts once at the local tier
    return {
        "lookups": lookups,
        "hits_local": local_hit,
        "hits_shared": shared_hit,
        "misses_shared": shared_miss,
        "hit_ratio": (local_hit + shared_hit) / lookups if lookups else None,
        "hit_ratio_gauge": after.get("kefu_cache_hit_ratio{}"),
        "local_bytes": after.get("kefu_cache_local_bytes{}"),
        "pregenerations": {result: delta(f"kefu_pregenerations_total{{result={result}}}")
                           for result in ("started", "served", "wasted", "skipped")},
        "upstream_generations": sum(
            delta(name) for name in after if name.startswith("kefu_llm_requests_total{")
            and "provider=openai_compatible" in name),
    }


PROBLEM = re.compile(r"Traceback|\bERROR\b|CRITICAL|\bWARNING\b|Exception", re.IGNORECASE)


def log_problems(log_dir: Path, limit: int = 8) -> dict[str, list[str]]:
    """Distinct warning/error lines per process log (digits blanked to group them), most frequent first."""
    found: dict[str, list[str]] = {}
    for path in sorted(log_dir.glob("*.log")):
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for line in path.read_text(errors="replace").splitlines():
            if PROBLEM.search(line):
                key = re.sub(r"\d+", "N", line[40:240])
                counts[key] += 1
                examples.setdefault(key, line[:300])
        if counts:
            found[path.stem] = [f"{n}x {examples[k]}" for k, n in counts.most_common(limit)]
    return found


# ---------------------------------------------------------------- figures


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = percentiles([v * 1000 for v in values], (50, 95, 99))
    return {"p50": p50, "p95": p95, "p99": p99}


def turn_figures(turns: Sequence[Turn], duration_s: float) -> dict[str, Any]:
    good = [t for t in turns if t.ok and t.ttft_s is not None]
    half = (max((t.visitor for t in turns), default=0) + 1) // 2
    faq = [t for t in good if t.kind == "faq"]
    return {
        "turns": len(turns),
        "failed": sum(1 for t in turns if not t.ok),
        "errors": dict(Counter(t.error or "unknown" for t in turns if not t.ok)),
        "cached": sum(t.cached for t in good),
        "hit_ratio": sum(t.cached for t in good) / len(good) if good else None,
        "hit_ratio_faq": sum(t.cached for t in faq) / len(faq) if faq else None,
        "personal_cached": sum(1 for t in good if t.kind == "personal" and t.cached),
        "predicted_cacheable": sum(t.predicted_cacheable for t in turns),
        "cached_but_not_predicted": sum(1 for t in good if t.cached and not t.predicted_cacheable),
        "duration_s": duration_s,
        "ttft_ms": _ms([t.ttft_s for t in good if t.ttft_s is not None]),
        "ttft_mean_ms": (sum(t.ttft_s for t in good if t.ttft_s is not None) * 1000 / len(good)) if good else None,
        "under_goal": (sum(1 for t in good if t.ttft_s is not None and t.ttft_s * 1000 < P95_GOAL_MS) / len(good)
                       if good else None),
        "ttft_ms_later_half": _ms([t.ttft_s for t in good if t.ttft_s is not None and t.visitor >= half]),
        "ttft_ms_hits": _ms([t.ttft_s for t in good if t.cached and t.ttft_s is not None]),
        "ttft_ms_misses": _ms([t.ttft_s for t in good if not t.cached and t.ttft_s is not None]),
        "ttft_ms_personal": _ms([t.ttft_s for t in good if t.kind == "personal" and t.ttft_s is not None]),
        "ttft_ms_novel": _ms([t.ttft_s for t in good if t.kind == "novel" and t.ttft_s is not None]),
        # The turns the cache rule lets the cache serve at all (predicted with the worker's own rule).
        "ttft_ms_cacheable": _ms([t.ttft_s for t in good if t.predicted_cacheable and t.ttft_s is not None]),
        "hit_ratio_cacheable": (sum(t.cached for t in good if t.predicted_cacheable)
                                / max(1, sum(1 for t in good if t.predicted_cacheable))),
        "ttft_ms_later_turns": _ms([t.ttft_s for t in good if t.index > 0 and t.ttft_s is not None]),
        "hit_ratio_later_turns": (sum(t.cached for t in good if t.index > 0)
                                  / max(1, sum(1 for t in good if t.index > 0))),
        "total_ms": _ms([t.total_s for t in good]),
    }


MEDIAN_FIGURES = ("hit_ratio", "under_goal", "ttft_mean_ms", "hit_ratio_later_turns", "hit_ratio_cacheable")
MEDIAN_MS = ("ttft_ms", "ttft_ms_later_half", "ttft_ms_hits", "ttft_ms_misses", "ttft_ms_personal", "ttft_ms_novel",
             "ttft_ms_cacheable", "ttft_ms_later_turns", "total_ms")


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    middle = len(known) // 2
    return known[middle] if len(known) % 2 else (known[middle - 1] + known[middle]) / 2


def median_rounds(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per mode, in the order first run: every figure the tables show as the median over its rounds
    (each figure on its own, so a row may mix rounds); `rounds_p95` lists each round's p95."""
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_mode.setdefault(run["mode"]["name"], []).append(run)
    out = []
    for group in by_mode.values():
        if len(group) == 1:
            out.append({**group[0], "rounds_p95": [group[0]["figures"]["ttft_ms"]["p95"]]})
            continue
        figures = dict(group[0]["figures"])
        for name in MEDIAN_FIGURES:
            figures[name] = _median([g["figures"][name] for g in group])
        for name in MEDIAN_MS:
            figures[name] = {q: _median([g["figures"][name][q] for g in group]) for q in ("p50", "p95", "p99")}
        figures["failed"] = sum(g["figures"]["failed"] for g in group)
        figures["errors"] = dict(sum((Counter(g["figures"]["errors"]) for g in group), Counter()))
        metrics = dict(group[0]["metrics"])
        for name in ("lookups", "hits_local", "hits_shared", "hit_ratio"):
            metrics[name] = _median([g["metrics"][name] for g in group])
        metrics["pregenerations"] = {k: _median([g["metrics"]["pregenerations"][k] for g in group])
                                     for k in group[0]["metrics"]["pregenerations"]}
        live = {k: _median([g["live_streams"][k] for g in group]) for k in ("mean", "max", "share_at_or_over_8")}
        out.append({"mode": group[0]["mode"], "figures": figures, "metrics": metrics, "live_streams": live,
                    "upstream_calls": _median([g["upstream_calls"] for g in group]),
                    "cpu_s": {"llm_worker": _median([g["cpu_s"].get("llm_worker") for g in group])},
                    "rounds_p95": [g["figures"]["ttft_ms"]["p95"] for g in group]})
    return out


def _cell(value: float | None, fmt: str = ".0f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def render_markdown(report: Mapping[str, Any]) -> str:
    p, w, machine = report["parameters"], report["workload"], report["machine"]
    direct = report["direct"]
    lines = [
        f"# kefu cache bench, {report['timestamp']}",
        "",
        f"{machine['cpu_count']} CPUs, load average {machine['loadavg_start'][0]:.2f} at start, "
        f"{machine['loadavg_end'][0]:.2f} at end. Upstream TTFT {p['ttft_ms']:g} ms, {p['chunks']} chunks "
        f"{p['interval_ms']:g} ms apart. {w['visitors']} visitors ({p['concurrency']} at a time), {w['turns']} "
        f"turns ({w['personal_turns']} personal), seed {p['workload']['seed']}, Zipf s={p['workload']['zipf_s']}, "
        f"reading time {p['workload']['think_s'][0]:g}-{p['workload']['think_s'][1]:g} s; "
        f"free wordings {p['workload']['free_share']:g}, novel {p['workload']['novel_share']:g}, personal "
        f"{p['workload']['personal_share']:g}; "
        + (f"measured after {p['prior_visitors']} unmeasured earlier visitors (seed+1) in the same tenants "
           f"(steady state); " if p['prior_visitors'] else "measured from a cold start; ")
        + (f"medians of {p['rounds']} rounds per mode (modes alternating); " if p['rounds'] > 1 else "")
        + "times in ms.",
        "",
        "| mode | turns | errors | from cache, all turns | hits / lookups (metrics) | TTFT p50 | TTFT p95 "
        "| TTFT p99 | TTFT mean | under 380 ms | p95, later half | cache hits p50 / p95 | upstream calls "
        "| worker CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| direct (no kefu) | {direct['requests']} | {direct['failed']} | – | – | "
        f"{_cell(direct['ttft_ms']['p50'])} | {_cell(direct['ttft_ms']['p95'])} | {_cell(direct['ttft_ms']['p99'])} "
        f"| – | – | – | – | {direct['requests']} | – |",
    ]
    for run in report["modes"]:
        f, m = run["figures"], run["metrics"]
        lines.append(
            f"| {run['mode']['name']} | {f['turns']} | {f['failed']} | {_pct(f['hit_ratio'])} | "
            f"{_pct(m['hit_ratio']) if run['mode']['cache'] else '–'} | "
            f"{_cell(f['ttft_ms']['p50'])} | **{_cell(f['ttft_ms']['p95'])}** | {_cell(f['ttft_ms']['p99'])} | "
            f"{_cell(f['ttft_mean_ms'])} | {_pct(f['under_goal'])} | {_cell(f['ttft_ms_later_half']['p95'])} | "
            f"{_cell(f['ttft_ms_hits']['p50'])} / {_cell(f['ttft_ms_hits']['p95'])} | "
            f"{_cell(run['upstream_calls'])} | {_cell(run['cpu_s'].get('llm_worker'), '.1f')} |")
    lines += [
        "",
        f"Workload: {w['faq_turns']} FAQ turns ({w['free_wording_turns']} worded as the FAQ does not), "
        f"{w['novel_turns']} the FAQ does not cover and {w['personal_turns']} personal ones; {w['distinct_texts']} "
        f"distinct texts, {w['distinct_keys']} distinct normalised questions. The worker's rule lets "
        f"{w['cacheable_turns']} turns ({_pct(w['cacheable_share'])}) use the cache (predicted with the "
        f"knowledge-base plugin); with {w['distinct_cacheable_keys']} distinct keys among them, a cache alone "
        f"(unbounded, cold start, no pre-generation) can answer at most {_pct(w['cache_only_ceiling'])} of the "
        f"turns; {w['canonical_turns']} cacheable turns map to an FAQ entry's canonical question, leaving "
        f"{w['distinct_answer_slots']} distinct answers, so with canonical keys a cache alone can answer at most "
        f"{_pct(w['canonical_cache_only_ceiling'])}. Pre-generation can be asked for "
        f"{w['pregen_candidates']} distinct questions, of which "
        f"{w['pregen_candidates_asked']} are ever asked by a cacheable turn ({w['cacheable_pregen_shaped_turns']} "
        f"cacheable turns are worded, after normalisation, as pre-generation words their entry). "
        f"p95 under {P95_GOAL_MS:g} ms needs at least 95 % of all turns answered from the cache: every other "
        f"turn waits for the upstream's first token ({p['ttft_ms']:g} ms).",
        "",
        "| mode | cacheable: lookups / predicted | from cache, 2nd+ turns | TTFT p50 / p95, 2nd+ turns "
        "| from cache / TTFT p50 / p95, cacheable turns | TTFT p95, personal / novel "
        "| pregen started / served / skipped / wasted | live streams mean / max / ≥ 8 | local / shared hits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["modes"]:
        f, m, live = run["figures"], run["metrics"], run["live_streams"]
        pregen = m["pregenerations"]
        pregen_cell = (" / ".join(f"{pregen[k]:.0f}" for k in ("started", "served", "skipped", "wasted"))
                       if run["mode"]["pregen"] else "–")
        if run["mode"]["cache"]:
            lookups, tiers = f"{m['lookups']:.0f} / {f['predicted_cacheable']}", \
                f"{m['hits_local']:.0f} / {m['hits_shared']:.0f}"
        else:
            lookups, tiers = f"– / {f['predicted_cacheable']}", "–"
        lines.append(
            f"| {run['mode']['name']} | {lookups} | {_pct(f['hit_ratio_later_turns'])} | "
            f"{_cell(f['ttft_ms_later_turns']['p50'])} / {_cell(f['ttft_ms_later_turns']['p95'])} | "
            f"{_pct(f['hit_ratio_cacheable'])} / {_cell(f['ttft_ms_cacheable']['p50'])} / "
            f"{_cell(f['ttft_ms_cacheable']['p95'])} | "
            f"{_cell(f['ttft_ms_personal']['p95'])} / {_cell(f['ttft_ms_novel']['p95'])} | {pregen_cell} | "
            f"{live['mean']:.1f} / {live['max']:.0f} / {_pct(live['share_at_or_over_8'])} | {tiers} |")
    verdicts = []
    for run in report["modes"]:
        if run["mode"]["cache"] and run["mode"]["pregen"]:
            p95 = run["figures"]["ttft_ms"]["p95"]
            met = p95 is not None and p95 < P95_GOAL_MS
            verdicts.append(f"- {run['mode']['name']}: p95 {_cell(p95)} ms, goal {P95_GOAL_MS:g} ms "
                            f"{'met' if met else 'NOT met'}; {_pct(run['figures']['under_goal'])} of the turns "
                            f"had their first token within {P95_GOAL_MS:g} ms (95 % needed); over the turns the "
                            f"cache may serve at all, p95 {_cell(run['figures']['ttft_ms_cacheable']['p95'])} ms; "
                            f"p95 of each round: {', '.join(_cell(v) for v in run['rounds_p95'])} ms.")
    problems = [f"- {mode}/{proc}: {line}" for mode, by_proc in report["log_problems"].items()
                for proc, found in by_proc.items() for line in found]
    errors = [f"- {run['mode']['name']}: {json.dumps(run['figures']['errors'])}"
              for run in report["modes"] if run["figures"]["errors"]]
    lines += ["", *verdicts]
    if errors:
        lines += ["", "Errors:", *errors]
    if problems:
        lines += ["", "Warnings and errors in the process logs:", *problems]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


@dataclass(frozen=True, slots=True)
class CacheBenchParams:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    modes: tuple[str, ...] = ("off", "cache", "cache+pregen", "2-tenants")
    concurrency: int = 20
    direct_requests: int = 100
    warmup: int = 4
    ttft_ms: float = 1200.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 60.0
    pregen_tokens_per_minute: int | None = None
    """KEFU_PREGEN_TOKENS_PER_MINUTE for the worker; None keeps its default."""
    pregen_concurrency: int | None = None
    """KEFU_PREGEN_CONCURRENCY for the worker; None keeps its default."""
    rounds: int = 1
    """Times every mode runs (alternating); the tables show medians."""
    prior_visitors: int = 0
    """Unmeasured earlier traffic, in the measured tenants, before the measured stream: visitors drawn
    like the stream's but with seed+1 (other questions from the same distribution). 0 measures a cold
    start; a few hundred measure a worker that has been serving for a while (steady state)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"--modes takes a comma-separated subset of {list(MODES)}, got {list(self.modes)}")
        if self.concurrency < 1 or self.direct_requests < 0 or self.warmup < 0 or self.prior_visitors < 0 \
                or self.rounds < 1:
            raise ValueError("--concurrency must be >= 1, --direct-requests and --warmup >= 0")

    def worker_env(self) -> dict[str, str]:
        env = {}
        if self.pregen_tokens_per_minute is not None:
            env["KEFU_PREGEN_TOKENS_PER_MINUTE"] = str(self.pregen_tokens_per_minute)
        if self.pregen_concurrency is not None:
            env["KEFU_PREGEN_CONCURRENCY"] = str(self.pregen_concurrency)
        return env


QUICK = CacheBenchParams(workload=WorkloadSpec(visitors=30, think_s=(1.0, 2.0)),
                         modes=("off", "cache", "cache+pregen"), direct_requests=20, warmup=1)


def parse_args(argv: Sequence[str] | None) -> tuple[CacheBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 visitors, 3 modes, reading 1-2 s: about a minute")
    parser.add_argument("--visitors", type=int, help="visitors in the stream (default 200)")
    parser.add_argument("--concurrency", type=int, help="visitors at a time (default 20)")
    parser.add_argument("--seed", type=int, help="seed of the question stream")
    parser.add_argument("--zipf-s", type=float, help="Zipf exponent over entries and phrasings (default 1.1)")
    parser.add_argument("--related-bias", type=float, help="chance the next question follows `related` (0.6)")
    parser.add_argument("--personal-share", type=float, help="share of questions about the visitor's order (0.1)")
    parser.add_argument("--free-share", type=float,
                        help="share of FAQ questions worded as the FAQ does not (held-out wordings; 0)")
    parser.add_argument("--novel-share", type=float, help="share of questions the FAQ does not cover (0)")
    parser.add_argument("--rounds", type=int, help="times every mode runs, alternating; medians reported (1)")
    parser.add_argument("--prior-visitors", type=int,
                        help="unmeasured earlier visitors (seed+1) in the measured tenants first: steady state (0)")
    parser.add_argument("--think-s", help="reading time between a visitor's questions, 'min,max' s (1.5,4)")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--direct-requests", type=int, help="requests on the direct path (default 100)")
    parser.add_argument("--warmup", type=int, help="unmeasured turns per stack, in a tenant of their own (4)")
    parser.add_argument("--ttft-ms", type=float, help="upstream time to first token (default 1200)")
    parser.add_argument("--chunks", type=int, help="upstream content chunks per answer (default 20)")
    parser.add_argument("--interval-ms", type=float, help="upstream delay between chunks (default 10)")
    parser.add_argument("--timeout-s", type=float, help="deadline of one request (default 60)")
    parser.add_argument("--pregen-tokens-per-minute", type=int, help="KEFU_PREGEN_TOKENS_PER_MINUTE for the worker")
    parser.add_argument("--pregen-concurrency", type=int, help="KEFU_PREGEN_CONCURRENCY for the worker")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folders")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CacheBenchParams()
    try:
        workload_over: dict[str, Any] = {k: v for k, v in (
            ("visitors", args.visitors), ("seed", args.seed), ("zipf_s", args.zipf_s),
            ("related_bias", args.related_bias), ("personal_share", args.personal_share),
            ("free_share", args.free_share), ("novel_share", args.novel_share)) if v is not None}
        if args.think_s:
            low, high = (float(x) for x in args.think_s.split(","))
            workload_over["think_s"] = (low, high)
        over: dict[str, Any] = {k: getattr(args, k) for k in (
            "concurrency", "direct_requests", "warmup", "ttft_ms", "chunks", "interval_ms", "timeout_s",
            "pregen_tokens_per_minute", "pregen_concurrency", "prior_visitors", "rounds")
            if getattr(args, k) is not None}
        if args.modes:
            over["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        return replace(base, workload=replace(base.workload, **workload_over), **over), args
    except ValueError as error:
        parser.error(str(error))


async def measure_direct(params: CacheBenchParams, upstream_url: str, visitors: Sequence[Visitor]) -> dict[str, Any]:
    """The same questions straight to the upstream, closed loop at the same concurrency, no reading pauses."""
    questions = itertools.cycle([q.text for v in visitors for q in v.questions])

    def body(user: int, seq: int) -> Mapping[str, Any]:
        return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                             {"role": "user", "content": next(questions)}]}

    target = Target("direct", f"{upstream_url}/chat/completions", "openai", body)
    result = await run_load(target, LoadSpec(params.concurrency, requests=params.direct_requests,
                                             timeout_s=params.timeout_s))
    ttfts = [r.ttft_s for r in result.samples if r.ok and r.ttft_s is not None]
    return {"requests": result.requests, "failed": result.failed, "errors": result.errors,
            "ttft_ms": _ms(ttfts), "total_ms": _ms([r.total_s for r in result.samples if r.ok])}


def run_mode(params: CacheBenchParams, mode: Mode, work_dir: Path, upstream_url: str, secret: str,
             visitors: Sequence[Visitor], cacheable: Sequence[Sequence[bool]],
             prior: Sequence[Visitor] = (), prior_cacheable: Sequence[Sequence[bool]] = ()) -> dict[str, Any]:
    stats_url = upstream_url.removesuffix("/v1") + "/stats"
    t0 = time.monotonic()
    stack = start_mode_stack(work_dir, upstream_url, secret, mode, params.worker_env())
    log.info("%s: stack ready in %.1f s", mode.name, time.monotonic() - t0)
    metrics_url = f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics"
    principals = Principals(secret)
    try:
        asyncio.run(warm_up(stack.base_url, principals, params.warmup, params.timeout_s))
        prior_summary = None
        if prior:
            t0 = time.monotonic()
            prior_turns, _, _ = asyncio.run(run_stream(
                stack.base_url, prior, prior_cacheable, TENANTS[:mode.tenants], principals, params.concurrency,
                params.timeout_s, metrics_url))
            prior_summary = {"visitors": len(prior), "turns": len(prior_turns),
                             "failed": sum(1 for t in prior_turns if not t.ok),
                             "cached": sum(1 for t in prior_turns if t.ok and t.cached),
                             "duration_s": round(time.monotonic() - t0, 1)}
            log.info("%s: prior traffic %s", mode.name, prior_summary)
        pids = {name: process.pid for name, process in stack.processes.items()}
        if stack.nats is not None:
            pids["nats"] = stack.nats.process.pid
        before, upstream_before, cpu_before = scrape(metrics_url), fetch_json(stats_url), cpu_snapshot(pids)
        turns, duration, streams = asyncio.run(run_stream(
            stack.base_url, visitors, cacheable, TENANTS[:mode.tenants], principals, params.concurrency,
            params.timeout_s, metrics_url))
        after, upstream_after, cpu_after = scrape(metrics_url), fetch_json(stats_url), cpu_snapshot(pids)
    finally:
        t0 = time.monotonic()
        stack.stop()
        log.info("%s: stack stopped in %.1f s", mode.name, time.monotonic() - t0)
    figures = turn_figures(turns, duration)
    metrics = cache_figures(before, after)
    result = {
        "mode": asdict(mode),
        "prior": prior_summary,
        "figures": figures,
        "metrics": metrics,
        "upstream_calls": upstream_after["requests_total"] - upstream_before["requests_total"],
        "upstream_max_in_flight": upstream_after.get("max_in_flight"),
        "cpu_s": {name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after if name in cpu_before},
        "live_streams": {"samples": len(streams), "max": max(streams, default=0.0),
                         "mean": sum(streams) / len(streams) if streams else 0.0,
                         # Pre-generation waits while the worker has this many live streams.
                         "share_at_or_over_8": sum(s >= 8 for s in streams) / len(streams) if streams else 0.0},
        "turns": [asdict(t) for t in turns],
    }
    log.info("%s: %d turns, %d failed, hit ratio %s, TTFT p50 %s p95 %s ms, %d upstream calls, %.0f s",
             mode.name, figures["turns"], figures["failed"], _pct(figures["hit_ratio"]),
             _cell(figures["ttft_ms"]["p50"]), _cell(figures["ttft_ms"]["p95"]), result["upstream_calls"], duration)
    return result


def run(params: CacheBenchParams, work_dir: Path, results_dir: Path) -> tuple[str, Path, bool]:
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    secret = secrets.token_hex(32)
    plugins_dir = REPO_ROOT / "plugins"
    faq = load_faq(plugins_dir)
    visitors = WorkloadBuilder(faq, params.workload).build()
    knower = asyncio.run(load_knowledge_base(plugins_dir))
    cacheable = [predicted_cacheable(v, knower) for v in visitors]
    # Earlier traffic: other visitors of the same distribution, indices far from the measured ones (same
    # parity, so the same tenant split) so no principal is reused.
    prior = [replace(v, index=v.index + PRIOR_INDEX_OFFSET) for v in WorkloadBuilder(faq, replace(
        params.workload, seed=params.workload.seed + 1, visitors=max(1, params.prior_visitors))).build()
             ][:params.prior_visitors]
    prior_cacheable = [predicted_cacheable(v, knower) for v in prior]
    workload = {tenants: workload_stats(faq, visitors, cacheable, tenants, knower)
                for tenants in sorted({MODES[m].tenants for m in params.modes})}
    upstream_params = BenchParams(ttft_ms=params.ttft_ms, chunks=params.chunks, interval_ms=params.interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    runs: list[dict[str, Any]] = []
    problems: dict[str, dict[str, list[str]]] = {}
    try:
        direct = asyncio.run(measure_direct(params, upstream_url, visitors))
        log.info("direct: %d requests, TTFT p50 %s p95 %s ms", direct["requests"],
                 _cell(direct["ttft_ms"]["p50"]), _cell(direct["ttft_ms"]["p95"]))
        # Rounds alternate the modes (off, cache, cache+pregen, off, ...), so a change in the machine's
        # load during the run hits every mode alike; the tables report each mode's median round.
        for round_ in range(1, params.rounds + 1):
            for name in params.modes:
                mode_dir = work_dir / f"r{round_}-{re.sub(r'[^a-z0-9]+', '-', name)}"
                mode_dir.mkdir(parents=True)
                try:
                    run = run_mode(params, MODES[name], mode_dir, upstream_url, secret, visitors, cacheable,
                                   prior, prior_cacheable)
                    runs.append({**run, "round": round_})
                finally:
                    found = log_problems(mode_dir / "logs") if (mode_dir / "logs").exists() else {}
                    if found:
                        problems[f"{name} round {round_}"] = found
    finally:
        stop_process(upstream)
    report = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_start": loadavg_start,
                    "loadavg_end": os.getloadavg()},
        "parameters": asdict(params),
        "workload": workload[1] if 1 in workload else next(iter(workload.values())),
        "workload_by_tenants": {str(k): v for k, v in workload.items()},
        "direct": direct,
        "rounds": runs,
        "modes": median_rounds(runs),
        "log_problems": problems,
    }
    markdown = render_markdown(report)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"cache-{report['timestamp']}.json"
    _write(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    had_errors = bool(direct["failed"]) or any(r["figures"]["failed"] for r in runs)
    return markdown, json_path, had_errors


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    with bench_work_dir("kefu-cache-bench-", args.keep_logs) as work:
        markdown, json_path, had_errors = run(params, work.path, args.results_dir)
        work.keep = work.keep or had_errors
    print(markdown, end="")
    log.info("wrote %s in %.0f s", json_path, time.monotonic() - t0)


if __name__ == "__main__":
    main()
