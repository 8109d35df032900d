"""The seed folder: `<dir>/<tenant>/<file>` ingested at worker start when missing or changed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from services.common.errors import KefuError
from services.llm_worker.kb.service import KnowledgeBase
from services.llm_worker.kb.store import ID_PATTERN

log = logging.getLogger(__name__)

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


def seed_document_id(path: Path) -> str:
    """`shipping-policy.md` -> `shipping-policy`: the file name without extension, as an id."""
    return _NOT_ID.sub("-", path.stem).strip("-")[:64] or "document"


async def seed(base: KnowledgeBase, folder: Path) -> int:
    """Store every file whose bytes differ from its document's newest version; how many were stored.

    Idempotent, also with several replicas at once: an unchanged file stores nothing, and two replicas
    storing the same change race on a compare-and-set, the loser then finding it unchanged. Hidden
    entries (a Kubernetes ConfigMap's `..data`) are skipped.
    """
    stored = 0
    if not folder.is_dir():
        log.warning("KEFU_KB_SEED_DIR %s is not a folder; nothing seeded", folder)
        return 0
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
            version_before = None
            try:
                data = path.read_bytes()
                found = await base.store.record(tenant, seed_document_id(path))
                version_before = found[0].version if found else 0
                record = await base.put(tenant, document_id=seed_document_id(path), title="", url="",
                                        filename=path.name, content_type="", data=data, skip_unchanged=True)
            except (KefuError, OSError) as error:
                log.warning("seed %s/%s not stored: %s", tenant, path.name, error)
                continue
            if record.version != version_before:
                stored += 1
                log.info("seeded %s/%s as document %s version %d", tenant, path.name, record.document_id,
                         record.version)
    return stored
