"""The URL table of the edge, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import chat, health, models, openai_compat, sessions


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_post("/v1/chat", chat.chat)
    app.router.add_post("/v1/chat/completions", openai_compat.chat_completions)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/sessions/{session_id}/messages", sessions.list_messages)
    app.router.add_delete("/v1/sessions/{session_id}", sessions.delete_session)
