"""The URL table of the edge and the roles each protected route accepts, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.handlers import chat, health, models, openai_compat, openapi, sessions, ws
from gateway.pages import setup_pages

EVERYONE = frozenset({"visitor", "agent", "admin"})
STAFF = frozenset({"agent", "admin"})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.openapi_document)
    setup_pages(app)  # the shop page, widget.js and the agent console: public static files
    # Live chat authenticates in its handler (a browser sends its token in the first frame).
    app.router.add_get("/v1/ws", ws.websocket)
    protected = (
        ("POST", "/v1/chat", chat.chat, EVERYONE),
        ("POST", "/v1/chat/completions", openai_compat.chat_completions, EVERYONE),
        ("GET", "/v1/models", models.list_models, EVERYONE),
        ("GET", "/v1/sessions/{session_id}/messages", sessions.list_messages, EVERYONE),
        ("DELETE", "/v1/sessions/{session_id}", sessions.delete_session, EVERYONE),
    )
    for method, path, handler, roles in protected:
        route = app.router.add_route(method, path, handler)
        app[keys.ROUTE_ROLES][route.resource.canonical] = roles  # type: ignore[union-attr]
