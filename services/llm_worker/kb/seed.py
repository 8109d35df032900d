"""The seed folder: `<dir>/<tenant>/<file>` ingested at worker start when missing or changed."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import KefuError
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import ID_PATTERN

log = logging.getLogger(__name__)

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Seeded:
    tenant: str
    document_id: str
    version: int


def seed_document_id(path: Path) -> str:
    """`shipping-policy.md` -> `shipping-policy`: the file name without extension, as an id."""
    return _NOT_ID.sub("-", path.stem).strip("-")[:64] or "document"


async def seed(base: KnowledgeBase, folder: Path) -> list[Seeded]:
    """Store every file whose bytes differ from its document's newest version; the versions stored.

    Idempotent, also with several replicas at once: an unchanged file stores nothing, and two replicas
    storing the same change race on a compare-and-set, the loser then finding it unchanged. Hidden
    entries (a Kubernetes ConfigMap's `..data`) are skipped.
    """
    stored: list[Seeded] = []
    if not folder.is_dir():
        log.warning("KEFU_KB_SEED_DIR %s is not a folder; nothing seeded", folder)
        return stored
    for tenant_dir in sorted(folder.iterdir()):
        if tenant_dir.name.startswith(".") or not tenant_dir.is_dir():
            continue
        tenant = tenant_dir.name
        if not ID_PATTERN.fullmatch(tenant):
            log.warning("seed folder %s is not a tenant name; skipped", tenant_dir)
            continue
        for path in sorted(tenant_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            document_id = seed_document_id(path)
            try:
                data = path.read_bytes()
                found = await base.store.record(tenant, document_id)
                record = await base.put(tenant, document_id=document_id, title="", url="", filename=path.name,
                                        content_type="", data=data, skip_unchanged=True)
            except (KefuError, OSError) as error:
                log.warning("seed %s/%s not stored: %s", tenant, path.name, error)
                continue
            if found is None or record.version != found[0].version:
                stored.append(Seeded(tenant, record.document_id, record.version))
                log.info("seeded %s/%s as document %s version %d", tenant, path.name, record.document_id,
                         record.version)
    return stored


async def wait_settled(base: KnowledgeBase, seeded: list[Seeded], timeout_s: float) -> bool:
    """Wait until every seeded version is ingested (ready or failed, by any replica); False at the timeout."""
    deadline = time.monotonic() + timeout_s
    pending = list(seeded)
    while pending:
        still = []
        for item in pending:
            found = await base.store.record(item.tenant, item.document_id)
            if found is not None and found[0].version == item.version and found[0].status in ("queued", "indexing"):
                still.append(item)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
    return True
