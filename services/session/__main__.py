"""`python -m services.session`: the conversation state service."""

from services.common.entrypoint import run_process
from services.session.server import serve
from services.session.settings import SessionSettings

if __name__ == "__main__":
    run_process("session", SessionSettings.load, serve)
