"""Moderation settings from `KEFU_*` variables, lexicon watch included."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import SettingsError
from services.moderation.settings import BUNDLED_LEXICON, ModerationSettings

DEV = {"KEFU_INTERNAL_AUTH": "off"}
"""Settings read as a dev machine would (no internal token); every other variable as the test names it."""


def test_settings_defaults_watch_the_bundled_lexicon() -> None:
    settings = ModerationSettings.load(DEV)
    assert settings.lexicon_dir == BUNDLED_LEXICON and settings.lexicon_watch
    assert (settings.lexicon_quiet_ms, settings.lexicon_debounce_ms) == (200, 1600)


def test_settings_read_the_lexicon_variables() -> None:
    settings = ModerationSettings.load({**DEV, "KEFU_LEXICON_DIR": "/etc/kefu/lexicon",
                                        "KEFU_LEXICON_WATCH": "false", "KEFU_LEXICON_QUIET_MS": "500",
                                        "KEFU_LEXICON_DEBOUNCE_MS": "5000"})
    assert settings.lexicon_dir == Path("/etc/kefu/lexicon") and not settings.lexicon_watch
    assert (settings.lexicon_quiet_ms, settings.lexicon_debounce_ms) == (500, 5000)


@pytest.mark.parametrize(("env", "name"), [
    ({"KEFU_LEXICON_WATCH": "sometimes"}, "KEFU_LEXICON_WATCH"),
    ({"KEFU_LEXICON_QUIET_MS": "5"}, "KEFU_LEXICON_QUIET_MS"),
    ({"KEFU_LEXICON_QUIET_MS": "3000"}, "KEFU_LEXICON_QUIET_MS"),  # longer than the debounce
])
def test_settings_bad_lexicon_variable_is_named(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        ModerationSettings.load({**DEV, **env})
