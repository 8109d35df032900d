"""Document bytes to sections of paragraphs (or FAQ items) with the registry's parsers; one-line errors."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import docx
import pypdf
from bs4 import BeautifulSoup, Comment, Doctype, Tag
from bs4.element import CData, Declaration, NavigableString, ProcessingInstruction
from docx.opc.exceptions import PackageNotFoundError
from docx.table import Table
from docx.text.paragraph import Paragraph
from markdown_it import MarkdownIt
from markdown_it.token import Token

from services.common.errors import InvalidArgument
from services.llm_worker.knowledge.models import DocumentFormat, FaqItem, ParsedDocument, Section


class UnsupportedFormat(InvalidArgument):
    """A file kefu does not read (the edge answers 415)."""

    code = "unsupported_media_type"

    def __init__(self, filename: str, content_type: str) -> None:
        shown = filename or content_type or "this file"
        super().__init__(f"unsupported document type: {shown} (expected Markdown, text, HTML, PDF, DOCX, "
                         "or an FAQ list as JSON or CSV)")
        self.filename = filename
        self.content_type = content_type


class DocumentParseError(InvalidArgument):
    """A file of a supported type that does not parse; `message` is one line saying why."""

    code = "document_unparseable"

    def __init__(self, message: str, document_format: DocumentFormat | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.format = document_format


_EXTENSIONS = {
    "md": DocumentFormat.MARKDOWN, "markdown": DocumentFormat.MARKDOWN, "mdown": DocumentFormat.MARKDOWN,
    "txt": DocumentFormat.TEXT, "text": DocumentFormat.TEXT,
    "html": DocumentFormat.HTML, "htm": DocumentFormat.HTML, "xhtml": DocumentFormat.HTML,
    "pdf": DocumentFormat.PDF,
    "docx": DocumentFormat.DOCX,
    "json": DocumentFormat.FAQ_JSON,
    "csv": DocumentFormat.FAQ_CSV,
}
_CONTENT_TYPES = {
    "text/markdown": DocumentFormat.MARKDOWN, "text/x-markdown": DocumentFormat.MARKDOWN,
    "text/plain": DocumentFormat.TEXT,
    "text/html": DocumentFormat.HTML, "application/xhtml+xml": DocumentFormat.HTML,
    "application/pdf": DocumentFormat.PDF,
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": DocumentFormat.DOCX,
    "application/json": DocumentFormat.FAQ_JSON,
    "text/csv": DocumentFormat.FAQ_CSV,
}
_GENERIC_CONTENT_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def detect_format(filename: str, content_type: str = "") -> DocumentFormat:
    """The format by the file name's extension, else by the content type; UnsupportedFormat otherwise."""
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if "." in name:
        found = _EXTENSIONS.get(name.rsplit(".", 1)[1].strip().lower())
        if found is not None:
            return found
    media_type = content_type.split(";", 1)[0].strip().lower()
    found = _CONTENT_TYPES.get(media_type)
    if found is not None:
        return found
    if "." not in name and media_type in _GENERIC_CONTENT_TYPES:
        return DocumentFormat.TEXT  # a pasted text without a name
    raise UnsupportedFormat(filename, content_type)


def parse_document(data: bytes, filename: str, content_type: str = "") -> ParsedDocument:
    """Parse a document; UnsupportedFormat or DocumentParseError (one line, naming why), never another error."""
    document_format = detect_format(filename, content_type)
    parser = _PARSERS[document_format]
    try:
        parsed = parser(data)
    except DocumentParseError as error:
        error.format = document_format
        raise
    except RecursionError:
        raise DocumentParseError(f"{_LABELS[document_format]} is nested too deeply to read", document_format) from None
    except Exception as error:  # noqa: BLE001 - third-party parsers raise anything on hostile bytes
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise DocumentParseError(f"{_LABELS[document_format]} could not be read: {reason}", document_format) from error
    if not parsed.faqs and not any(section.paragraphs for section in parsed.sections):
        raise DocumentParseError(_EMPTY[document_format], document_format)
    return parsed


_LABELS = {
    DocumentFormat.MARKDOWN: "Markdown", DocumentFormat.TEXT: "text", DocumentFormat.HTML: "HTML",
    DocumentFormat.PDF: "PDF", DocumentFormat.DOCX: "DOCX", DocumentFormat.FAQ_JSON: "FAQ JSON",
    DocumentFormat.FAQ_CSV: "FAQ CSV",
}
_EMPTY = {
    DocumentFormat.MARKDOWN: "Markdown document has no text",
    DocumentFormat.TEXT: "text document is empty",
    DocumentFormat.HTML: "HTML page has no text",
    DocumentFormat.PDF: "PDF has no extractable text (a scan needs OCR first)",
    DocumentFormat.DOCX: "DOCX has no text",
    DocumentFormat.FAQ_JSON: "FAQ JSON has no entries",
    DocumentFormat.FAQ_CSV: "FAQ CSV has no rows",
}


def decode_text(data: bytes, label: str = "text") -> str:
    """UTF-8 (with or without a BOM), else GB18030; DocumentParseError for anything else."""
    if b"\x00" in data:
        raise DocumentParseError(f"{label} is not text: it contains NUL bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError:
        raise DocumentParseError(f"{label} is neither UTF-8 nor GB18030 text") from None


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in "WF"


def join_lines(lines: list[str]) -> str:
    """Lines of one paragraph as one line: no space next to a wide (Chinese) character, one space elsewhere."""
    joined = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if joined and not (_wide(joined[-1]) or _wide(line[0])):
            joined += " "
        joined += line
    return joined


_BLANK_LINES = re.compile(r"\n\s*\n")


def _paragraphs(text: str) -> list[str]:
    return [p for p in (join_lines(block.splitlines()) for block in _BLANK_LINES.split(text)) if p]


class _Sections:
    """Collects paragraphs under the current heading path."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self._path: list[tuple[int, str]] = []
        self._paragraphs: list[str] = []
        self.first_heading = ""

    def heading(self, level: int, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        self._close()
        self.first_heading = self.first_heading or text
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, text))

    def paragraph(self, text: str) -> None:
        text = text.strip()
        if text:
            self._paragraphs.append(text)

    def done(self) -> tuple[Section, ...]:
        self._close()
        return tuple(self.sections)

    def _close(self) -> None:
        if self._paragraphs:
            self.sections.append(Section(heading=tuple(t for _, t in self._path), paragraphs=tuple(self._paragraphs)))
            self._paragraphs = []


def _parse_text(data: bytes) -> ParsedDocument:
    text = decode_text(data)
    section = Section(heading=(), paragraphs=tuple(_paragraphs(text)))
    return ParsedDocument(format=DocumentFormat.TEXT, sections=(section,))


def _inline_text(token: Token) -> str:
    lines: list[str] = [""]
    for child in token.children or ():
        if child.type in ("text", "code_inline"):
            lines[-1] += child.content
        elif child.type == "image":
            lines[-1] += child.content  # its alt text
        elif child.type in ("softbreak", "hardbreak"):
            lines.append("")
    return join_lines(lines)


def _parse_markdown(data: bytes) -> ParsedDocument:
    text = decode_text(data, "Markdown")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    sections = _Sections()
    row: list[str] | None = None
    for index, token in enumerate(tokens):
        if token.type == "inline":
            opener = tokens[index - 1] if index else None
            content = _inline_text(token)
            if opener is not None and opener.type == "heading_open":
                sections.heading(int(opener.tag[1:]), content)
            elif row is not None:
                row.append(content)
            else:
                sections.paragraph(content)
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            sections.paragraph(" | ".join(cell for cell in row if cell))
            row = None
        elif token.type in ("fence", "code_block"):
            sections.paragraph(token.content)
        elif token.type == "html_block":
            sections.paragraph(" ".join(BeautifulSoup(token.content, "html.parser").get_text(" ").split()))
    return ParsedDocument(format=DocumentFormat.MARKDOWN, sections=sections.done(), title=sections.first_heading)


_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_HTML_DROPPED = frozenset({"script", "style", "nav", "noscript", "template", "head", "svg", "iframe", "object"})
_HTML_BLOCKS = frozenset(
    "p div li ul ol dl dt dd pre blockquote section article main aside header footer table tr td th thead tbody "
    "tfoot caption figure figcaption form fieldset address details summary hr body html".split()
)
_HTML_SKIPPED_STRINGS = (Comment, Doctype, ProcessingInstruction, Declaration, CData)


def _parse_html(data: bytes) -> ParsedDocument:
    soup = BeautifulSoup(data, "html.parser")
    title_tag = soup.find("title")
    page_title = " ".join(title_tag.get_text(" ").split()) if isinstance(title_tag, Tag) else ""
    sections = _Sections()
    buffer: list[str] = []

    def flush() -> None:
        sections.paragraph(" ".join("".join(buffer).split()))
        buffer.clear()

    # An explicit stack, not recursion: a hostile page may nest tags thousands deep.
    stack: list[Any] = [iter(soup.contents)]
    closes_block: list[bool] = []
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            if closes_block and closes_block.pop():
                flush()
            continue
        if isinstance(node, NavigableString):
            if not isinstance(node, _HTML_SKIPPED_STRINGS):
                buffer.append(str(node))
        elif isinstance(node, Tag):
            name = (node.name or "").lower()
            if name in _HTML_DROPPED:
                continue
            if name in _HTML_HEADINGS:
                flush()
                sections.heading(_HTML_HEADINGS[name], node.get_text(" "))
            elif name == "br":
                buffer.append("\n")
            else:
                block = name in _HTML_BLOCKS
                if block:
                    flush()
                stack.append(iter(node.contents))
                closes_block.append(block)
    flush()
    return ParsedDocument(format=DocumentFormat.HTML, sections=sections.done(),
                          title=page_title or sections.first_heading)


def _parse_pdf(data: bytes) -> ParsedDocument:
    # pypdf accepts a header anywhere in the first kilobyte, as readers do.
    if b"%PDF-" not in data[:1024]:
        raise DocumentParseError("not a PDF: no %PDF header")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
    except pypdf.errors.PdfReadError as error:
        raise DocumentParseError(f"PDF is damaged: {error}") from None
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")
        except Exception:  # noqa: BLE001 - an unknown algorithm, a damaged dictionary
            opened = pypdf.PasswordType.NOT_DECRYPTED
        if opened == pypdf.PasswordType.NOT_DECRYPTED:
            raise DocumentParseError("PDF is encrypted with a password")
    paragraphs: list[str] = []
    for page in reader.pages:
        paragraphs.extend(_paragraphs(page.extract_text() or ""))
    title = ""
    try:
        metadata = reader.metadata
        title = " ".join(str(metadata.title or "").split()) if metadata is not None else ""
    except Exception:  # noqa: BLE001 - a damaged info dictionary only costs the title
        title = ""
    return ParsedDocument(format=DocumentFormat.PDF, sections=(Section(heading=(), paragraphs=tuple(paragraphs)),),
                          title=title)


_DOCX_HEADING = re.compile(r"(?:heading|标题)\s*(\d)", re.IGNORECASE)


def _docx_heading_level(paragraph: Paragraph) -> int | None:
    style = paragraph.style
    name = (style.name or "") if style is not None else ""
    if name.lower() == "title":
        return 1
    match = _DOCX_HEADING.match(name)
    return int(match.group(1)) if match else None


def _table_rows(table: Table) -> Iterator[str]:
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = " ".join(cell.text.split())
            if text and (not cells or cells[-1] != text):  # a merged cell repeats in every grid column
                cells.append(text)
        if cells:
            yield " | ".join(cells)


def _parse_docx(data: bytes) -> ParsedDocument:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise DocumentParseError("DOCX is not a zip file")
    try:
        document = docx.Document(io.BytesIO(data))
    except (KeyError, ValueError, zipfile.BadZipFile, PackageNotFoundError) as error:
        raise DocumentParseError(f"DOCX is not a Word document: {error}") from None
    sections = _Sections()
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            level = _docx_heading_level(block)
            if level is not None:
                sections.heading(level, block.text)
            else:
                sections.paragraph(block.text)
        else:
            for row in _table_rows(block):
                sections.paragraph(row)
    title = ""
    try:
        title = " ".join((document.core_properties.title or "").split())
    except Exception:  # noqa: BLE001 - damaged core properties only cost the title
        title = ""
    return ParsedDocument(format=DocumentFormat.DOCX, sections=sections.done(), title=title or sections.first_heading)


def _text_field(entry: Mapping[str, object], key: str) -> str:
    value = entry.get(key)
    return " ".join(value.split()) if isinstance(value, str) else ""


def _faq_item(entry: object, number: int) -> FaqItem:
    if not isinstance(entry, dict):
        raise DocumentParseError(f"FAQ JSON: entry {number} is not an object")
    question, answer = _text_field(entry, "question"), (entry.get("answer") or "")
    if not question:
        raise DocumentParseError(f"FAQ JSON: entry {number} has no question")
    if not isinstance(answer, str) or not answer.strip():
        raise DocumentParseError(f"FAQ JSON: entry {number} has no answer")
    alternates = entry.get("alternates", [])
    if not isinstance(alternates, list) or not all(isinstance(a, str) for a in alternates):
        raise DocumentParseError(f"FAQ JSON: entry {number}: alternates must be a list of texts")
    return FaqItem(question=question, answer=answer.strip(),
                   alternates=tuple(a.strip() for a in alternates if a.strip()), handoff=entry.get("handoff") is True)


def _shop_faq_items(entry: object, number: int) -> list[FaqItem]:
    """One item per language of an entry of plugins/shop_faq.json: {"questions": {lang: [..]}, "answer": {lang}}."""
    if not isinstance(entry, dict) or not isinstance(entry.get("questions"), dict):
        raise DocumentParseError(f"FAQ JSON: entry {number} has no questions")
    answers = entry.get("answer")
    if not isinstance(answers, dict):
        raise DocumentParseError(f"FAQ JSON: entry {number} has no answer")
    items: list[FaqItem] = []
    for language, questions in entry["questions"].items():
        phrasings = [" ".join(q.split()) for q in questions if isinstance(q, str) and q.strip()] \
            if isinstance(questions, list) else []
        answer = answers.get(language)
        if not phrasings:
            raise DocumentParseError(f"FAQ JSON: entry {number} has no {language} question")
        if not isinstance(answer, str) or not answer.strip():
            raise DocumentParseError(f"FAQ JSON: entry {number} has no {language} answer")
        items.append(FaqItem(question=phrasings[0], answer=answer.strip(), alternates=tuple(phrasings[1:]),
                             handoff=entry.get("handoff") is True))
    return items


def _parse_faq_json(data: bytes) -> ParsedDocument:
    text = decode_text(data, "FAQ JSON")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DocumentParseError(f"FAQ JSON is not valid JSON: {error.msg} at line {error.lineno} "
                                 f"column {error.colno}") from None
    items: list[FaqItem] = []
    if isinstance(document, dict) and isinstance(document.get("entries"), list):
        for number, entry in enumerate(document["entries"], 1):
            items.extend(_shop_faq_items(entry, number))
    else:
        entries = document.get("faqs") if isinstance(document, dict) else document
        if not isinstance(entries, list):
            raise DocumentParseError('FAQ JSON: expected a list of {"question", "answer"} or {"faqs": [...]}')
        items = [_faq_item(entry, number) for number, entry in enumerate(entries, 1)]
    return ParsedDocument(format=DocumentFormat.FAQ_JSON, faqs=tuple(items))


def _cell(row: list[str], column: int | None) -> str:
    return row[column].strip() if column is not None and column < len(row) else ""


def _parse_faq_csv(data: bytes) -> ParsedDocument:
    text = decode_text(data, "FAQ CSV")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        if "question" not in header or "answer" not in header:
            raise DocumentParseError('FAQ CSV: the first row must name the columns "question" and "answer"')
        q_col, a_col = header.index("question"), header.index("answer")
        alt_col = header.index("alternates") if "alternates" in header else None
        items: list[FaqItem] = []
        for row in reader:
            question, answer = " ".join(_cell(row, q_col).split()), _cell(row, a_col)
            if not question and not answer:
                continue
            if not question:
                raise DocumentParseError(f"FAQ CSV: row {reader.line_num} has no question")
            if not answer:
                raise DocumentParseError(f"FAQ CSV: row {reader.line_num} has no answer")
            alternates = tuple(a.strip() for a in _cell(row, alt_col).split("|") if a.strip())
            items.append(FaqItem(question=question, answer=answer, alternates=alternates))
    except csv.Error as error:
        raise DocumentParseError(f"FAQ CSV could not be read: {error} (line {reader.line_num})") from None
    return ParsedDocument(format=DocumentFormat.FAQ_CSV, faqs=tuple(items))


_PARSERS: dict[DocumentFormat, Callable[[bytes], ParsedDocument]] = {
    DocumentFormat.MARKDOWN: _parse_markdown,
    DocumentFormat.TEXT: _parse_text,
    DocumentFormat.HTML: _parse_html,
    DocumentFormat.PDF: _parse_pdf,
    DocumentFormat.DOCX: _parse_docx,
    DocumentFormat.FAQ_JSON: _parse_faq_json,
    DocumentFormat.FAQ_CSV: _parse_faq_csv,
}
