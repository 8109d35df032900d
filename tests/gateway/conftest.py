"""The edge over the real session service (tests/gateway/session_edge.py): its fixtures `session`, `stub` and
`client` for every module here (a module's own fixture of the same name wins)."""

from tests.gateway.session_edge import client, session, stub  # noqa: F401 - pytest fixtures
