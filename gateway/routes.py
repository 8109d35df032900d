"""The URL table of the edge and the roles each protected route accepts, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.auth import API, STAFF_ROLES
from gateway.handlers import (
    blacklist,
    canned_replies,
    chat,
    console_login,
    conversations,
    health,
    knowledge,
    models,
    openai_compat,
    openapi,
    sessions,
    tenant_settings,
    widget_token,
    ws,
)
from gateway.live.held_routes import held_visitors
from gateway.pages import setup_pages

EVERYONE = frozenset({"visitor", "agent", "admin"})
STAFF = STAFF_ROLES
ADMINS = frozenset({"admin"})
CHAT = EVERYONE | {API}
"""Where an `api` integrator may go: the chat turns and the model list, nothing of live chat or staff."""


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    if app[keys.SETTINGS].metrics_on_http_port:  # older scrape setups; by default its own port (gateway/__main__.py)
        app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.openapi_document)
    setup_pages(app)  # the shop page, widget.js and the agent console: public static files
    # Live chat authenticates in its handler (a browser sends its token in the first frame).
    app.router.add_get("/v1/ws", ws.websocket)
    # Public: they hand out tokens (middlewares.PUBLIC_API_PATHS), limited per client address.
    app.router.add_post("/v1/widget/token", widget_token.widget_token)
    app.router.add_post("/v1/console/login", console_login.console_login)
    protected = (
        ("POST", "/v1/chat", held_visitors(chat.chat), CHAT),
        ("POST", "/v1/chat/completions", held_visitors(openai_compat.chat_completions), CHAT),
        ("GET", "/v1/models", models.list_models, CHAT),
        ("GET", "/v1/sessions/{session_id}/messages", sessions.list_messages, EVERYONE),
        ("DELETE", "/v1/sessions/{session_id}", sessions.delete_session, EVERYONE),
        ("GET", "/v1/conversations", conversations.list_conversations, STAFF),
        ("GET", "/v1/conversations/{conversation_id}/events", conversations.conversation_events, EVERYONE),
        ("GET", "/v1/canned-replies", canned_replies.list_canned_replies, STAFF),
        ("POST", "/v1/canned-replies", canned_replies.create_canned_reply, STAFF),
        ("DELETE", "/v1/canned-replies/{reply_id}", canned_replies.delete_canned_reply, STAFF),
        ("GET", "/v1/blacklist", blacklist.list_blacklist, STAFF),
        ("POST", "/v1/blacklist", blacklist.create_blacklist_entry, STAFF),
        ("DELETE", "/v1/blacklist/{entry_id}", blacklist.delete_blacklist_entry, STAFF),
        # PUT is for admins only: the handler checks (this table holds one role set per path).
        ("GET", "/v1/tenant/settings", tenant_settings.get_tenant_settings, STAFF),
        ("PUT", "/v1/tenant/settings", tenant_settings.put_tenant_settings, STAFF),
        ("GET", "/v1/knowledge/documents", knowledge.list_documents, ADMINS),
        ("POST", "/v1/knowledge/documents", knowledge.put_document, ADMINS),
        ("GET", "/v1/knowledge/documents/{document_id}", knowledge.get_document, ADMINS),
        ("DELETE", "/v1/knowledge/documents/{document_id}", knowledge.delete_document, ADMINS),
        ("POST", "/v1/knowledge/search", knowledge.search, STAFF),
    )
    for method, path, handler, roles in protected:
        resource = app.router.add_route(method, path, handler).resource
        assert resource is not None  # add_route always makes one; aiohttp types it optional for other routes
        app[keys.ROUTE_ROLES][resource.canonical] = roles
