"""The cache bench's question stream: a Zipf-like FAQ workload of visitors, paraphrases and follow-ups."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import opencc

from bench.chat_params import REPLY
from gateway.settings import DEFAULT_SYSTEM_PROMPT
from services.llm_worker.cache_key import cacheable_question, normalize_question
from services.llm_worker.plugin_api import ChatMessage, PluginContext

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
