"""The real system as processes: nats-server on a free port, the three services and the edge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.devstack.stack import Stack, free_port
from tests.e2e.stack_helpers import faq_plugins_env, start_stack


@pytest.fixture(scope="module")
def kb_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The default system: the offline knowledge-base responder answers, every tenant from the tea shop's FAQ."""
    data_dir = tmp_path_factory.mktemp("kb-stack")
    stack = start_stack(data_dir, {"KEFU_RATE_LIMIT_RPS": "1000", **faq_plugins_env(data_dir)})
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def upstream_stack(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Stack]:
    """The default route served by openai_compatible against a fake upstream on `upstream_port`.

    Each test starts its own FakeUpstream on that port, with the behaviour it needs.
    """
    stack = start_stack(tmp_path_factory.mktemp("upstream-stack"), {
        "KEFU_LOG_LEVEL": "DEBUG", "KEFU_CACHE_ENABLED": "false",  # these tests exercise the stream path
        "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "KEFU_MODEL": "fake-model",
        "KEFU_OPENAI_API_KEY": "sk-test"})
    try:
        yield stack
    finally:
        stack.stop()
