"""A small shop knowledge base built the way ingestion builds it: the demo FAQ plus two policy pages."""

from __future__ import annotations

from pathlib import Path

from services.llm_worker.knowledge.chunking import chunk_document
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk
from services.llm_worker.knowledge.parsing import parse_document

SHOP_FAQ = Path(__file__).resolve().parents[2] / "plugins" / "shop_faq.json"

RETURNS_MD = """# 退换货政策

## 退货条件

收到商品后7天内，茶叶未开封、包装完好，可以申请无理由退货。已开封的茶叶因食品安全原因不支持退货。

## 退货运费

因质量问题退货，运费由本店承担；无理由退货的运费由买家承担，退款在收到退货后3个工作日内原路退回。
"""

CARE_MD = """# Teaware care

## Yixing clay teapots

Rinse a Yixing clay teapot with hot water only. Never use soap or detergent: the unglazed clay absorbs it.
Let the pot dry with the lid off to prevent mould.

## Glass kettles

Glass kettles can go in the dishwasher on a gentle cycle.
"""


def shop_chunks() -> list[Chunk]:
    chunks: list[Chunk] = []
    for document_id, data, name, title in (
        ("faq", SHOP_FAQ.read_bytes(), "shop_faq.json", "常见问题"),
        ("returns", RETURNS_MD.encode(), "returns.md", ""),
        ("care", CARE_MD.encode(), "care.md", ""),
    ):
        chunks += chunk_document(parse_document(data, name), document_id=document_id, version=1, title=title,
                                 url=f"https://shop.example/{document_id}")
    return chunks


def shop_index() -> KnowledgeIndex:
    return KnowledgeIndex.build(shop_chunks())
