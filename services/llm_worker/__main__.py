"""`python -m services.llm_worker`: the plugin host that generates answers."""

from services.common.entrypoint import run_process
from services.llm_worker.server import serve
from services.llm_worker.settings import WorkerSettings

if __name__ == "__main__":
    run_process("llm_worker", WorkerSettings.load, serve)
