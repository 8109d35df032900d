"""Chunking: sections never mixed, paragraphs then sentences, token-sized with overlap, one chunk per FAQ item."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.llm_worker.knowledge.chunking import chunk_document, count_tokens
from services.llm_worker.knowledge.models import DocumentFormat, FaqItem, ParsedDocument, Section

ZH_SENTENCES = [f"第{n}条规定：收到商品后七天内可以申请退货，运费由买家承担。" for n in range(40)]
EN_SENTENCES = [f"Rule {n} says that unopened tea can be returned within seven days of delivery." for n in range(40)]


def doc_of(*sections: Section) -> ParsedDocument:
    return ParsedDocument(format=DocumentFormat.MARKDOWN, sections=sections)


def test_chunks_respect_the_token_budget_and_keep_sentences_whole() -> None:
    doc = doc_of(Section(("退货",), ("".join(ZH_SENTENCES),)), Section(("Returns",), (" ".join(EN_SENTENCES),)))
    chunks = chunk_document(doc, document_id="d1", version=2, title="Policy", max_tokens=120, overlap_tokens=30)
    assert len(chunks) > 4
    assert all(count_tokens(chunk.text) <= 125 for chunk in chunks)  # joining may merge a token or two
    for sentence in ZH_SENTENCES:
        assert any(sentence in chunk.text for chunk in chunks)
    for sentence in EN_SENTENCES:
        assert any(sentence in chunk.text for chunk in chunks)


def test_chunks_never_cross_sections_and_keep_the_heading_path() -> None:
    doc = doc_of(Section(("Shop", "Shipping"), ("We ship in two days.",)), Section(("Shop", "Refunds"),
                                                                                  ("Refunds take a week.",)))
    chunks = chunk_document(doc, document_id="d", version=1, title="Help", url="https://x/help")
    assert [(c.heading, c.text) for c in chunks] == [("Shop > Shipping", "We ship in two days."),
                                                      ("Shop > Refunds", "Refunds take a week.")]
    assert chunks[0].indexed_text == "Help\nShop > Shipping\nWe ship in two days."
    assert [c.chunk_id for c in chunks] == ["d-1-0", "d-1-1"]
    assert chunks[1].url == "https://x/help" and chunks[1].kind == "text"


def test_small_paragraphs_share_a_chunk_separated_by_line_breaks() -> None:
    chunks = chunk_document(doc_of(Section((), ("One.", "Two.", "Three."))), document_id="d", version=1, title="t")
    assert [c.text for c in chunks] == ["One.\nTwo.\nThree."]


def test_consecutive_chunks_overlap_by_whole_sentences() -> None:
    doc = doc_of(Section((), (" ".join(EN_SENTENCES[:12]),)))
    chunks = chunk_document(doc, document_id="d", version=1, title="t", max_tokens=60, overlap_tokens=20)
    for first, second in zip(chunks, chunks[1:], strict=False):
        last_sentence = first.text.rsplit(". ", 1)[-1]
        assert second.text.startswith(last_sentence)


def test_no_overlap_when_asked() -> None:
    doc = doc_of(Section((), (" ".join(EN_SENTENCES[:12]),)))
    chunks = chunk_document(doc, document_id="d", version=1, title="t", max_tokens=60, overlap_tokens=0)
    assert sum(c.text.count("Rule ") for c in chunks) == 12


def test_an_over_long_sentence_is_cut_to_fit() -> None:
    doc = doc_of(Section((), ("退" * 3000,)))
    chunks = chunk_document(doc, document_id="d", version=1, title="t", max_tokens=100, overlap_tokens=0)
    assert "".join(c.text for c in chunks) == "退" * 3000
    assert all(count_tokens(c.text) <= 100 for c in chunks)


def test_each_faq_item_is_exactly_one_chunk() -> None:
    doc = ParsedDocument(format=DocumentFormat.FAQ_JSON, faqs=(
        FaqItem("运费多少？", "满99元包邮。", ("包邮吗", "邮费怎么算")), FaqItem("转人工", "好的。", handoff=True)))
    chunks = chunk_document(doc, document_id="faq", version=3, title="FAQ")
    assert [(c.kind, c.heading, c.text, c.answer, c.handoff) for c in chunks] == [
        ("faq", "运费多少？", "运费多少？\n包邮吗\n邮费怎么算", "满99元包邮。", False),
        ("faq", "转人工", "转人工", "好的。", True),
    ]
    assert chunks[0].indexed_text == "运费多少？\n包邮吗\n邮费怎么算"


def test_title_falls_back_to_the_documents_own() -> None:
    doc = ParsedDocument(format=DocumentFormat.PDF, sections=(Section((), ("x",)),), title="Manual")
    assert chunk_document(doc, document_id="d", version=1, title="")[0].title == "Manual"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=400).filter(str.strip), min_size=1, max_size=8),
       st.integers(min_value=8, max_value=200))
def test_chunking_keeps_every_character_of_the_text(paragraphs: list[str], max_tokens: int) -> None:
    doc = doc_of(Section(("h",), tuple(p.strip() for p in paragraphs)))
    chunks = chunk_document(doc, document_id="d", version=1, title="t", max_tokens=max_tokens, overlap_tokens=0)
    assert "".join("".join(c.text.split()) for c in chunks) == "".join("".join(p.split()) for p in paragraphs)
