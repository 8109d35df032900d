"""`python -m services.moderation`: the sensitive-word filter."""

from services.common.entrypoint import run_process
from services.moderation.server import serve
from services.moderation.settings import ModerationSettings

if __name__ == "__main__":
    run_process("moderation", ModerationSettings.load, serve)
