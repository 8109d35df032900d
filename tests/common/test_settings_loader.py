"""The one settings loader: .env under the environment, one-line errors, unknown variables ignored, no secret shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from devtools.devstack.settings import DevStackSettings
from devtools.devstack.stack import REPO_ROOT, StackPorts
from gateway.settings import GatewaySettings
from services.common.settings import SettingsError
from services.llm_worker.settings import WorkerSettings
from services.moderation.settings import ModerationSettings
from services.session.settings import SessionSettings

DEV = {"KEFU_INTERNAL_AUTH": "off"}
SECRET = "s3cret-" + "x" * 40


def write_env(folder: Path, text: str, name: str = ".env") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_loader_reads_a_dotenv_file(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "# the dev box\nKEFU_SESSION_PORT=6001\nexport KEFU_SESSION_TTL_S=120\n"
                                   "KEFU_TOKEN_ENCODING='o200k_base'  # newer models\nKEFU_INTERNAL_AUTH=off\n")
    settings = SessionSettings.load({}, env_file)
    assert (settings.grpc_port, settings.session_ttl_s, settings.encoding) == (6001, 120, "o200k_base")
    assert settings.internal_token == ""


def test_settings_loader_environment_wins_over_dotenv(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "KEFU_SESSION_PORT=6001\nKEFU_MAX_MESSAGE_CHARS=100\n")
    settings = SessionSettings.load({**DEV, "KEFU_SESSION_PORT": "6002"}, env_file)
    assert (settings.grpc_port, settings.max_message_chars) == (6002, 100)


def test_settings_loader_missing_dotenv_is_no_error(tmp_path: Path) -> None:
    assert SessionSettings.load(DEV, tmp_path / "absent.env") == SessionSettings.load(DEV)


def test_settings_loader_by_default_reads_dotenv_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("KEFU_")]:
        monkeypatch.delenv(name)
    write_env(tmp_path, "KEFU_MODERATION_PORT=6003\nKEFU_INTERNAL_AUTH=off\n")
    write_env(tmp_path, "KEFU_MODERATION_PORT=6004\nKEFU_INTERNAL_AUTH=off\n", "other.env")
    monkeypatch.chdir(tmp_path)
    assert ModerationSettings.load().grpc_port == 6003
    monkeypatch.setenv("KEFU_MODERATION_PORT", "6005")
    assert ModerationSettings.load().grpc_port == 6005
    monkeypatch.delenv("KEFU_MODERATION_PORT")
    monkeypatch.setenv("KEFU_ENV_FILE", "other.env")
    assert ModerationSettings.load().grpc_port == 6004
    monkeypatch.setenv("KEFU_ENV_FILE", "")  # none: the internal token is then missing
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is not set"):
        ModerationSettings.load()


def test_settings_constructor_reads_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build settings from their arguments alone, whatever the shell or a .env says."""
    write_env(tmp_path, "KEFU_SESSION_PORT=6006\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEFU_SESSION_METRICS_PORT", "6007")
    settings = SessionSettings(max_message_chars=10)
    assert (settings.grpc_port, settings.metrics_port, settings.max_message_chars) == (50051, 9101, 10)


@pytest.mark.parametrize(("settings_class", "env", "message"), [
    (SessionSettings, {"KEFU_SESSION_PORT": "x"}, "KEFU_SESSION_PORT must be an integer, got 'x'"),
    (SessionSettings, {"KEFU_SESSION_PORT": "70000"}, "KEFU_SESSION_PORT must be <= 65535, got 70000"),
    (SessionSettings, {"KEFU_VISITOR_MSG_RPS": "0"}, "KEFU_VISITOR_MSG_RPS must be > 0, got 0"),
    (SessionSettings, {"KEFU_HANDOFF_WAIT_S": "soon"}, "KEFU_HANDOFF_WAIT_S must be a number, got 'soon'"),
    (ModerationSettings, {"KEFU_LEXICON_WATCH": "sometimes"},
     "KEFU_LEXICON_WATCH must be true or false, got 'sometimes'"),
    (ModerationSettings, {"KEFU_MAX_MODERATION_CHARS": "0"}, "KEFU_MAX_MODERATION_CHARS must be >= 1, got 0"),
    (GatewaySettings, {"KEFU_JWT_SECRET": "short"},
     "KEFU_JWT_SECRET is too short: 5 bytes, at least 32 needed (e.g. openssl rand -base64 32)"),
    (GatewaySettings, {"KEFU_JWT_SECRET": SECRET, "KEFU_RATE_LIMIT_ROUTES": "/v1/chat=fast"},
     "KEFU_RATE_LIMIT_ROUTES: /v1/chat: expected rps[:burst], got 'fast'"),
    (GatewaySettings, {"KEFU_JWT_SECRET": SECRET, "KEFU_EDGE_METRICS_PORT": "-1"},
     "KEFU_EDGE_METRICS_PORT must be >= 0, got -1"),
    (WorkerSettings, {"KEFU_INTERNAL_TOKEN": "t" * 31}, "KEFU_INTERNAL_TOKEN is too short: 31 bytes, at least 32 "
                                                         "needed (e.g. openssl rand -base64 32)"),
    (WorkerSettings, {"KEFU_OPENAI_BASE_URL": "ftp://x"}, "KEFU_OPENAI_BASE_URL must be an http(s) URL, got 'ftp://x'"),
])
def test_settings_loader_bad_value_is_one_line_naming_the_variable(
        settings_class: type[SessionSettings | ModerationSettings | GatewaySettings | WorkerSettings],
        env: dict[str, str], message: str) -> None:
    base = {} if "KEFU_INTERNAL_TOKEN" in env else DEV
    with pytest.raises(SettingsError) as error:
        settings_class.load({**base, **env})
    assert str(error.value) == message


def test_settings_loader_never_quotes_a_secret_it_refuses() -> None:
    with pytest.raises(SettingsError) as error:
        GatewaySettings.load({**DEV, "KEFU_JWT_SECRET": "tiny-secret"})
    assert "tiny-secret" not in str(error.value)


def test_settings_loader_bad_value_stops_the_process_with_one_line(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    env.update({"KEFU_ENV_FILE": "", "KEFU_INTERNAL_AUTH": "off", "KEFU_MODERATION_PORT": "port"})
    done = subprocess.run([sys.executable, "-m", "services.moderation"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "moderation: KEFU_MODERATION_PORT must be an integer, got 'port'\n"


def test_make_run_reads_dotenv_in_its_working_directory(tmp_path: Path) -> None:
    """`make run` reads .env itself (and then passes every setting on): a bad secret there stops it at once."""
    write_env(tmp_path, "KEFU_JWT_SECRET=too-short-dotenv-secret\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEFU_")}
    # Were .env not read, the stack would start and fail fast at its first process, not wait for the timeout.
    env.update({"PYTHONPATH": str(REPO_ROOT), "KEFU_DATA_DIR": str(tmp_path / "data"),
                "NATS_SERVER_BIN": str(tmp_path / "no-nats-server")})
    done = subprocess.run([sys.executable, "-m", "devtools.devstack"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "devstack: KEFU_JWT_SECRET is too short: 23 bytes" in done.stderr, done.stderr
    assert "too-short-dotenv-secret" not in done.stdout + done.stderr


def test_settings_loader_ignores_unknown_variables() -> None:
    """Each process reads its own; the others' variables (and the field names themselves) mean nothing to it."""
    plain = ModerationSettings.load(DEV)
    assert ModerationSettings.load({**DEV, "KEFU_SESSION_TTL_S": "x", "KEFU_NO_SUCH_THING": "1",
                                    "KEFU_HOST": "10.0.0.1", "KEFU_GRPC_PORT": "1", "PATH": "/bin"}) == plain
    assert ModerationSettings.load({**DEV, "KEFU_BIND_HOST": "0.0.0.0"}).host == "0.0.0.0"


def test_settings_repr_hides_secrets() -> None:
    settings = GatewaySettings.load({"KEFU_JWT_SECRET": SECRET, "KEFU_INTERNAL_TOKEN": "i" * 32 + "-internal",
                                     "KEFU_NATS_USER": "edge", "KEFU_NATS_PASSWORD": "nats-pass-word"})
    assert settings.nats_url == "nats://edge:nats-pass-word@127.0.0.1:4222"
    worker = WorkerSettings(openai_api_key="sk-upstream-key", openai_base_url="http://upstream")
    for text in (repr(settings), str(settings), repr(worker), str(worker)):
        for secret in (SECRET, "-internal", "nats-pass-word", "sk-upstream-key"):
            assert secret not in text
    assert "http_port=8080" in repr(settings) and "openai_base_url='http://upstream'" in repr(worker)


def test_settings_are_frozen_and_refuse_a_misspelt_argument() -> None:
    settings = SessionSettings()
    with pytest.raises(ValidationError):
        settings.grpc_port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="grpc_prot"):
        SessionSettings(grpc_prot=1)  # type: ignore[call-arg]


def test_settings_parsed_forms_from_variables() -> None:
    settings = GatewaySettings.load({**DEV, "KEFU_JWT_SECRET": SECRET, "KEFU_RATE_LIMIT_ROUTES": "/v1/chat=20:40",
                                     "KEFU_TENANT_RATE_LIMITS": "acme=200", "KEFU_WIDGET_TENANTS": " demo, shop1 ",
                                     "KEFU_TENANT_MAX_OUTPUT_TOKENS": "acme=2048", "KEFU_CORS_ORIGINS": "https://a/,*",
                                     "KEFU_HANDOFF_KEYWORDS": "human, 人工", "KEFU_MODEL": "gpt-4o"})
    assert settings.route_rate_limits == {"/v1/chat": (20.0, 40)} and settings.tenant_rate_limits == {"acme": 200.0}
    assert settings.widget_tenants == frozenset({"demo", "shop1"}) and settings.output_cap("acme") == 2048
    assert settings.cors_origins == ("https://a", "*") and settings.handoff_keywords == ("human", "人工")
    assert settings.model == ""  # KEFU_MODEL names the worker's upstream model only with KEFU_OPENAI_BASE_URL
    assert GatewaySettings.load({**DEV, "KEFU_JWT_SECRET": SECRET, "KEFU_MODEL": "gpt-4o",
                                 "KEFU_OPENAI_BASE_URL": "http://u"}).model == "gpt-4o"


def test_settings_keep_field_documents() -> None:
    description = GatewaySettings.model_fields["ws_send_queue"].description or ""
    assert description.startswith("KEFU_WS_SEND_QUEUE: frames queued for one socket")
    assert GatewaySettings.variable("metrics_port") == "KEFU_EDGE_METRICS_PORT"
    assert SessionSettings.variables()["default_context_tokens"] == "KEFU_CONTEXT_MAX_TOKENS"


def test_devstack_settings_read_its_ports_and_pass_secrets_through() -> None:
    settings = DevStackSettings.load({"KEFU_HTTP_PORT": "8081", "KEFU_NATS_PORT": "4333",
                                      "KEFU_NATS_URL": "nats://u:p@remote:4222", "KEFU_INTERNAL_AUTH": "Off"})
    assert settings.ports == StackPorts(http=8081, nats=4333) and settings.internal_auth_off
    assert settings.nats_url == "nats://u:p@remote:4222" and "u:p" not in repr(settings)
