"""Text to retrieval terms (folded, segmented, stemmed, without stop words) and text to sentences."""

from __future__ import annotations

import re
import threading
import unicodedata
from functools import lru_cache

import opencc
import rjieba
import Stemmer

# Function and question words (and greetings): they say how something is asked, not what about. Kept short on purpose:
# a word that names a topic in customer service ("不能", "使用", "今天") must stay searchable, unlike
# in bm25s' 841-word Chinese list.
ZH_STOP_WORDS = frozenset(
    """
    你好 您好 谢谢 麻烦 亲 嗨 哈喽 嘿 好的 已经 已 曾经 多久 多长 多长时间 多大 怎么办 咋办
    何时 何地 何人 何种 何处 因何 有何 哪一年 哪年 哪位 哪国 哪家 哪部 哪所 哪本 哪几 哪些地方 哪些方面
    第几 几条 几张 几类 几次 几项 几所 几名 几个 几种 由谁 时候 什么时候
    的 地 得 了 着 过 吗 呢 吧 啊 呀 嘛 哦 哈 呐 么 嗯 哇 哟 是 在 有 和 与 及
    或 就 都 也 还 又 被 把 给 对 从 向 于 以 为 之 其 所 而 则 且 等 等等 即
    这 那 这个 那个 这些 那些 这里 那里 个 我 你 您 他 她 它 我们 你们 他们 她们
    它们 咱们 自己 什么 什么样 怎么 怎么样 怎样 如何 为什么 为何 哪 哪里 哪儿 哪个 哪些
    哪种 谁 几 多少 请问 请 一下 可以 能 能否 会 要 想 是否 有没有 是不是 能不能
    可不可以 啥 咋 那么 还有 然后 就是 一个 一些 该 此 中 上 下 里
    """.split()
)
EN_STOP_WORDS = frozenset(
    """
    a an the is are am was were be been being do does did doing i me my mine myself you your yours we our ours us
    he him his she her hers it its they them their theirs this that these those to of in on at for with from by
    about into over and or but if so than then there here can could will would should shall may might must how
    what when where which why who whom whose please hi hello hey thanks thank ok okay any some also just very
    as not no yes too s t don doesn didn isn aren wasn weren won much many
    """.split()
)

# Sentence ends: Chinese 。！？；… (any run, then closing quotes or brackets), English . ! ? before a
# space or the end (not the dot of 3.14 or of a domain), and line breaks.
_CLOSERS = "”’」』）》】)\\]\"'"
_SENTENCE_END = re.compile(f"(?:[。！？；]+|[!?]+|…+|\\.+(?=\\s|$))[{_CLOSERS}]*|\\n+")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` in order, each stripped and keeping its end punctuation; no empty ones."""
    sentences: list[str] = []
    start = 0
    for end in _SENTENCE_END.finditer(text):
        piece = text[start : end.end()].strip()
        if piece:
            sentences.append(piece)
        start = end.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


_CJK = re.compile("[\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
_SEEN_LIMIT = 200_000
"""Tokens remembered per analyzer (a few MB)."""


def is_cjk(ch: str) -> bool:
    """A Han character (the scripts Chinese is written in, without spaces between words)."""
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\U00020000" <= ch <= "\U0003134f"


class Analyzer:
    """Turns text into the terms retrieval matches: NFKC, traditional to simplified Chinese, case folded;
    Chinese segmented into words (rjieba), English words stemmed (Snowball); stop words and punctuation
    dropped. Safe to share between threads (the stemmer, which is not, is per thread).

    Segmentation is jieba's search mode: a long word also gives its dictionary sub-words, so
    "中华人民共和国" matches a question about "共和国" (cited-document recall@1 on CMRC 0.969 -> 0.972)."""

    def __init__(self) -> None:
        self._local = threading.local()
        # token -> its term ("" when dropped): tokens repeat, and classifying one costs more than a lookup.
        self._seen: dict[str, str] = {}

    def normalize(self, text: str) -> str:
        """NFKC, traditional folded to simplified, case folded."""
        folded: str = self._t2s().convert(unicodedata.normalize("NFKC", text)).casefold()  # opencc is untyped
        return folded

    def terms(self, text: str) -> list[str]:
        """The retrieval terms of `text` in order, repeats kept (BM25 counts them)."""
        seen = self._seen
        found: list[str] = []
        for token in rjieba.cut_for_search(self.normalize(text)):
            term = seen.get(token)
            if term is None:
                term = self._term(token)
                if len(seen) >= _SEEN_LIMIT:
                    seen.clear()
                seen[token] = term
            if term:
                found.append(term)
        return found

    def _term(self, token: str) -> str:
        if not _LETTER_OR_DIGIT.search(token):
            return ""  # spaces, punctuation, symbols, emoji
        if _CJK.search(token):
            return "" if token in ZH_STOP_WORDS else token
        if token in EN_STOP_WORDS:
            return ""
        return self._stemmer().stemWord(token) if token.isascii() and token.isalpha() else token

    def _t2s(self) -> opencc.OpenCC:
        return _opencc()

    def _stemmer(self) -> Stemmer.Stemmer:
        stemmer: Stemmer.Stemmer | None = getattr(self._local, "stemmer", None)
        if stemmer is None:
            stemmer = self._local.stemmer = Stemmer.Stemmer("english")
        return stemmer


@lru_cache(maxsize=1)
def _opencc() -> opencc.OpenCC:
    # Built on first use (about 20 ms), not at import; one converter serves every analyzer.
    return opencc.OpenCC("t2s")


@lru_cache(maxsize=1)
def default_analyzer() -> Analyzer:
    """The analyzer indexes and queries share unless one is given (it holds no per-tenant state)."""
    return Analyzer()
