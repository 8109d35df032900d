"""Document parsing: every format into sections or FAQ items, one-line errors, and no crash on any bytes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import docx
import pytest
from fpdf import FPDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import KefuError
from services.llm_worker.knowledge.models import DocumentFormat, FaqItem
from services.llm_worker.knowledge.parsing import (
    DocumentParseError,
    UnsupportedFormat,
    detect_format,
    parse_document,
)

SHOP_FAQ = Path(__file__).resolve().parents[2] / "plugins" / "shop_faq.json"


def make_pdf(*pages: str, title: str = "") -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_docx() -> bytes:
    document = docx.Document()
    document.add_heading("Returns policy", level=1)
    document.add_paragraph("You can return any unopened tea within 7 days.")
    document.add_heading("Refunds", level=2)
    document.add_paragraph("Refunds reach your account in 3 working days.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Item", "Fee"
    table.cell(1, 0).text, table.cell(1, 1).text = "Teapot", "8 yuan"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("faq.md", "", DocumentFormat.MARKDOWN),
        ("notes.TXT", "", DocumentFormat.TEXT),
        ("page.htm", "", DocumentFormat.HTML),
        ("manual.pdf", "application/octet-stream", DocumentFormat.PDF),
        ("policy.docx", "", DocumentFormat.DOCX),
        ("faq.json", "", DocumentFormat.FAQ_JSON),
        ("faq.csv", "", DocumentFormat.FAQ_CSV),
        ("upload", "application/pdf", DocumentFormat.PDF),
        ("upload", "text/html; charset=utf-8", DocumentFormat.HTML),
        ("", "", DocumentFormat.TEXT),
    ],
)
def test_detect_format_by_extension_then_content_type(filename: str, content_type: str,
                                                      expected: DocumentFormat) -> None:
    assert detect_format(filename, content_type) is expected


@pytest.mark.parametrize(("filename", "content_type"), [("sheet.xlsx", ""), ("old.doc", "application/msword"),
                                                        ("image", "image/png")])
def test_detect_format_rejects_unsupported_types(filename: str, content_type: str) -> None:
    with pytest.raises(UnsupportedFormat) as caught:
        detect_format(filename, content_type)
    assert isinstance(caught.value, KefuError) and "unsupported" in caught.value.message


def test_markdown_headings_become_section_paths() -> None:
    source = ("# 退换货政策\n\n收到商品7天内可以退货。\n第二行。\n\n## 运费\n\n- 满99元包邮\n- 不满收8元\n\n"
              "| 地区 | 时效 |\n|---|---|\n| 国内 | 2-4天 |\n")
    doc = parse_document(source.encode(), "policy.md")
    assert doc.title == "退换货政策"
    assert doc.sections[0].heading == ("退换货政策",)
    assert doc.sections[0].paragraphs == ("收到商品7天内可以退货。第二行。",)
    assert doc.sections[1].heading == ("退换货政策", "运费")
    assert doc.sections[1].paragraphs == ("满99元包邮", "不满收8元", "地区 | 时效", "国内 | 2-4天")


def test_text_paragraphs_split_on_blank_lines_and_gb18030_decodes() -> None:
    doc = parse_document("第一段\n续行\n\n第二段 English".encode("gb18030"), "a.txt")
    assert doc.sections[0].paragraphs == ("第一段续行", "第二段 English")


def test_text_with_utf8_bom() -> None:
    assert parse_document("\ufeffhello".encode(), "a.txt").sections[0].paragraphs == ("hello",)


def test_html_headings_sections_and_dropped_chrome() -> None:
    page = b"""<html><head><title>Help</title><style>p{}</style></head><body>
      <nav>Home | Shop</nav><h1>Shipping</h1><p>We ship <b>fast</b>.</p><script>var x = 1;</script>
      <h2>Abroad</h2><ul><li>Japan</li><li>USA</li></ul><!-- hidden --></body></html>"""
    doc = parse_document(page, "help.html")
    assert doc.title == "Help"
    assert [(s.heading, s.paragraphs) for s in doc.sections] == [
        (("Shipping",), ("We ship fast.",)),
        (("Shipping", "Abroad"), ("Japan", "USA")),
    ]


def test_html_deep_nesting_does_not_crash() -> None:
    doc = parse_document(b"<div>" * 5000 + b"deep text" + b"</div>" * 5000, "deep.html")
    assert doc.sections[0].paragraphs == ("deep text",)


def test_pdf_pages_text_and_title() -> None:
    doc = parse_document(make_pdf("Orders ship within two days.", "Refunds take a week.", title="Shop manual"),
                         "manual.pdf")
    assert doc.format is DocumentFormat.PDF and doc.title == "Shop manual"
    assert doc.sections[0].paragraphs == ("Orders ship within two days.", "Refunds take a week.")


def test_pdf_without_header_names_why() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b"this is not a pdf at all", "broken.pdf")
    assert caught.value.message == "not a PDF: no %PDF header"


def test_pdf_truncated_fails_with_one_line() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(make_pdf("Some text here.")[:200], "cut.pdf")
    assert "\n" not in caught.value.message and "PDF" in caught.value.message


def test_pdf_without_text_names_why() -> None:
    pdf = FPDF()
    pdf.add_page()
    with pytest.raises(DocumentParseError) as caught:
        parse_document(bytes(pdf.output()), "scan.pdf")
    assert caught.value.message.startswith("PDF has no extractable text")


def test_docx_headings_paragraphs_and_tables() -> None:
    doc = parse_document(make_docx(), "policy.docx")
    assert doc.title == "Returns policy"
    assert [(s.heading, s.paragraphs) for s in doc.sections] == [
        (("Returns policy",), ("You can return any unopened tea within 7 days.",)),
        (("Returns policy", "Refunds"), ("Refunds reach your account in 3 working days.", "Item | Fee",
                                         "Teapot | 8 yuan")),
    ]


def test_docx_not_zip_names_why() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b"PK but not really", "x.docx")
    assert caught.value.message == "DOCX is not a zip file"


def test_docx_zip_without_document_fails() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(DocumentParseError) as caught:
        parse_document(out.getvalue(), "x.docx")
    assert caught.value.message.startswith("DOCX")


def test_faq_json_list_and_faqs_object() -> None:
    entries = [{"question": "运费多少？", "answer": "满99包邮。", "alternates": ["包邮吗"]},
               {"question": "How long?", "answer": "2-4 days."}]
    for payload in (entries, {"faqs": entries}):
        doc = parse_document(json.dumps(payload).encode(), "faq.json")
        assert doc.faqs == (FaqItem("运费多少？", "满99包邮。", ("包邮吗",)), FaqItem("How long?", "2-4 days."))


def test_faq_json_names_the_entry_without_answer() -> None:
    entries = [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}, {"question": "e"}]
    with pytest.raises(DocumentParseError) as caught:
        parse_document(json.dumps(entries).encode(), "faq.json")
    assert caught.value.message == "FAQ JSON: entry 3 has no answer"


def test_faq_json_invalid_json_is_one_line() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b'[{"question": ', "faq.json")
    assert caught.value.message.startswith("FAQ JSON is not valid JSON")


def test_faq_json_demo_shop_faq_ingests_as_is() -> None:
    doc = parse_document(SHOP_FAQ.read_bytes(), "shop_faq.json")
    shop = json.loads(SHOP_FAQ.read_text(encoding="utf-8"))
    assert len(doc.faqs) == 2 * len(shop["entries"])
    first = shop["entries"][0]
    assert doc.faqs[0] == FaqItem(first["questions"]["zh"][0], first["answer"]["zh"],
                                  tuple(first["questions"]["zh"][1:]))
    assert any(item.handoff for item in doc.faqs)


def test_faq_csv_with_alternates() -> None:
    data = "question,answer,alternates\n运费多少？,满99包邮。,包邮吗|邮费怎么算\n\nHow long?,2-4 days.,\n"
    doc = parse_document(data.encode("utf-8-sig"), "faq.csv")
    assert doc.faqs == (FaqItem("运费多少？", "满99包邮。", ("包邮吗", "邮费怎么算")),
                        FaqItem("How long?", "2-4 days."))


def test_faq_csv_requires_the_header_and_answers() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b"q,a\nx,y\n", "faq.csv")
    assert "question" in caught.value.message
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b"question,answer\nx,y\nz,\n", "faq.csv")
    assert caught.value.message == "FAQ CSV: row 3 has no answer"


def test_empty_documents_fail_with_a_reason() -> None:
    for data, name in ((b"", "a.txt"), (b"   \n\n", "a.md"), (b"[]", "a.json"), (b"question,answer\n", "a.csv")):
        with pytest.raises(DocumentParseError):
            parse_document(data, name)


def test_binary_text_is_refused() -> None:
    with pytest.raises(DocumentParseError) as caught:
        parse_document(b"\x00\x01\x02", "a.txt")
    assert caught.value.message == "text is not text: it contains NUL bytes"


FILENAMES = ["a.md", "a.txt", "a.html", "a.pdf", "a.docx", "a.json", "a.csv"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=2000), filename=st.sampled_from(FILENAMES))
def test_parse_document_raises_only_its_own_errors_on_random_bytes(data: bytes, filename: str) -> None:
    try:
        doc = parse_document(data, filename)
    except DocumentParseError as error:
        assert error.message and "\n" not in error.message
    else:
        assert doc.faqs or any(section.paragraphs for section in doc.sections)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=600), cut=st.integers(min_value=0, max_value=4000),
       filename=st.sampled_from(["a.pdf", "a.docx"]))
def test_parse_document_survives_damaged_real_files(data: bytes, cut: int, filename: str) -> None:
    original = make_pdf("Orders ship within two days.") if filename == "a.pdf" else make_docx()
    damaged = original[:cut] + data + original[cut + len(data):]
    try:
        parse_document(damaged, filename)
    except DocumentParseError as error:
        assert error.message and "\n" not in error.message
