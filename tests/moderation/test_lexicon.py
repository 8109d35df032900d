"""Reading a lexicon folder: actions, whitelist, and every way a file can be broken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.moderation.lexicon import Action, LexiconError, load_lexicon, parse_category
from services.moderation.settings import BUNDLED_LEXICON


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def test_lexicon_bundled_sample_loads_with_actions() -> None:
    lexicon = load_lexicon(BUNDLED_LEXICON)
    actions = {c.name: c.action for c in lexicon.categories}
    assert actions["abuse"] is Action.MASK and actions["fraud"] is Action.BLOCK
    assert actions["contact_leak"] is Action.REVIEW
    assert "shitake" in lexicon.whitelist


def test_lexicon_file_name_is_category_default_action_is_block(tmp_path: Path) -> None:
    lexicon = load_lexicon(write(tmp_path, {"spam.txt": "# no action line\n\n  buy now  \n#comment\n加微信\n"}))
    assert [(c.name, c.action, c.words) for c in lexicon.categories] == [("spam", Action.BLOCK, ("buy now", "加微信"))]


def test_lexicon_byte_order_mark_does_not_hide_the_action(tmp_path: Path) -> None:
    lexicon = load_lexicon(write(tmp_path, {"abuse.txt": "\ufeff# action: mask\nfuck\n".encode()}))
    assert lexicon.categories[0].action is Action.MASK and lexicon.categories[0].words == ("fuck",)


def test_lexicon_unknown_action_names_the_file() -> None:
    with pytest.raises(LexiconError, match="spam.txt:1"):
        parse_category("spam", "# action: nuke\nword\n")


def test_lexicon_action_line_after_the_first_line_is_refused() -> None:
    # It would otherwise be a comment, and a mask category would silently block.
    with pytest.raises(LexiconError, match="spam.txt:2: the action line must be the first line"):
        parse_category("spam", "# insults\n# action: mask\nword\n")


def test_lexicon_word_without_letters_or_digits_is_refused() -> None:
    with pytest.raises(LexiconError, match=r"spam.txt:3: '\*\*\*' has no letter or digit"):
        parse_category("spam", "# action: mask\nword\n***\n")


def test_lexicon_non_utf8_file_is_refused(tmp_path: Path) -> None:
    # A file cut in the middle of a character, as a partial write leaves it.
    write(tmp_path, {"good.txt": "word\n", "bad.txt": "刷单".encode()[:-1]})
    with pytest.raises(LexiconError, match="bad.txt: not UTF-8"):
        load_lexicon(tmp_path)


def test_lexicon_without_any_word_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"abuse.txt": "# action: mask\n", "whitelist.txt": "shitake\n"})
    with pytest.raises(LexiconError, match="has no words"):
        load_lexicon(tmp_path)


def test_lexicon_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="does not exist"):
        load_lexicon(tmp_path / "nope")


def test_lexicon_dangling_symlink_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"abuse.txt": "fuck\n"})
    os.symlink("..data/fraud.txt", tmp_path / "fraud.txt")
    with pytest.raises(LexiconError, match="fraud.txt: cannot be read"):
        load_lexicon(tmp_path)


def test_lexicon_ignores_dot_files_and_other_extensions(tmp_path: Path) -> None:
    write(tmp_path, {"abuse.txt": "fuck\n", ".abuse.txt.swp": b"\x00\xff", "abuse.txt~": "old\n",
                     "abuse.txt.tmp": "half", "README.md": "# words\n"})
    os.symlink("root@host.1234:1700000000", tmp_path / ".#abuse.txt")  # an emacs lock file
    lexicon = load_lexicon(tmp_path)
    assert [(c.name, c.words) for c in lexicon.categories] == [("abuse", ("fuck",))]


def test_lexicon_file_changed_while_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"abuse.txt": "fuck\n", "fraud.txt": "刷单返利\n"})
    original = Path.read_text

    def read_then_rewrite(path: Path, *args: object, **kwargs: object) -> str:
        text = original(path, *args, **kwargs)  # type: ignore[arg-type]
        if path.name == "abuse.txt":
            (tmp_path / "fraud.txt").write_text("刷单返利\n网络赌博\n", encoding="utf-8")
        return text

    monkeypatch.setattr(Path, "read_text", read_then_rewrite)
    with pytest.raises(LexiconError, match="changed while it was read"):
        load_lexicon(tmp_path)
