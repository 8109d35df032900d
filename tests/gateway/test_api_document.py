"""docs/api.md against the code: its error-code table, its environment variables and its routes."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from aiohttp import hdrs

from devtools.devstack.settings import DevStackSettings
from devtools.devstack.stack import free_port
from gateway.__main__ import EdgeWorkersSettings
from gateway.app import create_app
from gateway.errors import LIMIT_CODES, ApiError, api_error_from_grpc
from gateway.handlers.knowledge import knowledge_error
from gateway.settings import GatewaySettings
from services.common.settings import EventLoopSettings, KefuSettings
from services.llm_worker.settings import WorkerSettings
from services.moderation.settings import ModerationSettings
from services.session.settings import SessionSettings

REPO = Path(__file__).resolve().parents[2]
API_MD = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
CODE_DIRS = ("gateway", "services", "plugins", "devtools")  # devtools: `make run` reads KEFU_DATA_DIR and others

# Calls that name an error code, and the position of the code among their arguments.
CODE_ARGUMENT = {"ApiError": 0, "ParameterError": 0, "Refused": 0, "FrameError": 0, "StreamFailed": 0,
                 "ErrorFrame": 0, "Nack": 1, "SocketRefused": 1}


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def constant_strings(node: ast.AST | None) -> list[str]:
    """The string constants an expression can evaluate to (`a if c else b` gives both)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return constant_strings(node.body) + constant_strings(node.orelse)
    return []


def argument(node: ast.Call, index: int, keyword: str) -> ast.expr | None:
    if len(node.args) > index:
        return node.args[index]
    return next((k.value for k in node.keywords if k.arg == keyword), None)


def literal_codes() -> dict[str, set[int | None]]:
    """Every error code the edge's source names literally, with the HTTP status it goes with when known."""
    found: dict[str, set[int | None]] = defaultdict(set)
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in python_files("gateway")]
    statuses = class_statuses(trees)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = call_name(node)
                if name in CODE_ARGUMENT:
                    status = argument(node, 2, "status") if name == "ApiError" else None
                    http = status.value if isinstance(status, ast.Constant) and isinstance(status.value, int) \
                        else statuses.get(name)
                    for code in constant_strings(argument(node, CODE_ARGUMENT[name], "code")):
                        found[code].add(http)
                elif name == "__init__" and isinstance(node.func, ast.Attribute) and node.args:
                    # super().__init__("code", ...) in an ApiError subclass with `status = <int>`
                    owner = enclosing_class(tree, node)
                    if owner in statuses:
                        for code in constant_strings(node.args[0]):
                            found[code].add(statuses[owner])
                elif name == "get" and isinstance(node.func, ast.Attribute) and is_code_table(node.func.value):
                    # {404: "not_found", ...}.get(status, "http_error") and TRANSITION_CODES.get(..., "unavailable")
                    for value in [*dict_values(node.func.value, tree), *node.args[1:]]:
                        for code in constant_strings(value):
                            found[code].add(None)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "code":
                        for code in constant_strings(value):
                            found[code].add(None)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                for code in constant_strings(node.value):
                    found[code].add(None)
    return found


def class_statuses(trees: list[ast.Module]) -> dict[str, int]:
    """ApiError subclasses (by name, across the modules) that set `status = <int>` or inherit one from a
    base class that does."""
    statuses: dict[str, int] = {}
    bases: dict[str, list[str]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name != "ApiError":
                bases[node.name] = [base.id for base in node.bases if isinstance(base, ast.Name)]
                for item in node.body:
                    if (isinstance(item, ast.Assign) and len(item.targets) == 1
                            and isinstance(item.targets[0], ast.Name) and item.targets[0].id == "status"
                            and isinstance(item.value, ast.Constant) and isinstance(item.value.value, int)):
                        statuses[node.name] = item.value.value
    changed = True
    while changed:  # a subclass without its own status has its base's
        changed = False
        for name, parents in bases.items():
            inherited = next((statuses[p] for p in parents if p in statuses), None)
            if name not in statuses and inherited is not None:
                statuses[name] = inherited
                changed = True
    return statuses


def enclosing_class(tree: ast.Module, target: ast.AST) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(child is target for child in ast.walk(node)):
            return node.name
    return ""


def is_code_table(node: ast.expr) -> bool:
    return isinstance(node, ast.Dict) or (isinstance(node, ast.Name) and node.id.endswith("_CODES"))


def dict_values(node: ast.expr, tree: ast.Module) -> list[ast.expr]:
    if isinstance(node, ast.Dict):
        return list(node.values)
    name = node.id if isinstance(node, ast.Name) else ""
    for statement in tree.body:  # a module-level table: NAME = {...}
        if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == name for t in statement.targets)):
            return list(statement.value.values)
    return []


def mapped_codes() -> dict[str, set[int | None]]:
    """What api_error_from_grpc really gives, for every gRPC status and every backend the edge names."""
    backends = set()
    for path in python_files("gateway"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and call_name(node) in ("api_error_from_grpc", "_stream_failure"):
                backends.update(constant_strings(argument(node, 1, "backend")))
    assert {"session", "moderation", "llm"} <= backends
    found: dict[str, set[int | None]] = defaultdict(set)

    def add(api_error: ApiError) -> None:
        found[api_error.code].add(api_error.status)

    for code in grpc.StatusCode:
        error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
        add(knowledge_error(error))  # the knowledge routes' own mapping of the worker's refusals
        for backend in backends:
            add(api_error_from_grpc(error, backend))
    for limit in LIMIT_CODES:  # the session service names the limit it refused with in a trailer
        trailer = grpc.aio.Metadata(("kefu-error", limit))
        error = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailer, details="x")
        add(api_error_from_grpc(error, "session"))
    return found


def code_table() -> dict[str, str]:
    """docs/api.md's error-code table: code -> its HTTP cell."""
    section = API_MD.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, flags=re.MULTILINE)
    assert rows, "no error-code table under '## Error codes'"
    table = dict(rows)
    assert len(table) == len(rows), "a code is listed twice"
    return {code: http.strip() for code, http in table.items()}


def test_api_md_error_table_lists_exactly_the_codes_the_edge_produces() -> None:
    produced: dict[str, set[int | None]] = defaultdict(set)
    for source in (literal_codes(), mapped_codes()):
        for code, statuses in source.items():
            produced[code] |= statuses
    table = code_table()
    assert set(table) == set(produced), (f"in the code, not in docs/api.md: {sorted(set(produced) - set(table))}; "
                                         f"in docs/api.md, not in the code: {sorted(set(table) - set(produced))}")
    wrong = {code: (table[code], sorted(s for s in statuses if s is not None))
             for code, statuses in produced.items()
             if any(s is not None and str(s) not in table[code] for s in statuses)}
    assert not wrong, f"HTTP statuses the table does not state (table cell, code's statuses): {wrong}"


def test_api_md_error_table_collector_sees_each_kind_of_source() -> None:
    """The collector is only as good as the patterns it knows: each kind must still find something."""
    literal = literal_codes()
    assert 413 in literal["body_too_large"]  # an ApiError subclass's status
    assert 426 in literal["websocket_required"]  # ApiError(code, message, status)
    assert {"unknown_type", "claim_conflict", "not_assigned", "http_error", "invalid_state"} <= set(literal)
    assert 504 in mapped_codes()["upstream_timeout"]


STREAM_NAMES = {"KEFU_MESSAGES", "KEFU_KB_JOBS"}
"""JetStream streams: names in the text, not settings."""


def documented_variables() -> set[str]:
    return set(re.findall(r"\bKEFU_[A-Z0-9_]+[A-Z0-9]\b", API_MD)) - STREAM_NAMES


SETTINGS: tuple[type[KefuSettings], ...] = (GatewaySettings, EdgeWorkersSettings, SessionSettings, WorkerSettings,
                                            ModerationSettings, EventLoopSettings, DevStackSettings)
"""Every settings class: a field reads KEFU_<FIELD> without naming it in the source."""


def code_variables() -> set[str]:
    names: set[str] = {name for settings in SETTINGS for name in settings.variables().values()}
    for path in python_files(*CODE_DIRS):
        names.update(re.findall(r"\bKEFU_[A-Z0-9_]+[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    return names - STREAM_NAMES


def test_api_md_documents_every_environment_variable_and_no_other() -> None:
    code, documented = code_variables(), documented_variables()
    assert len(code) > 60
    assert code - documented == set(), "read by the code, missing from docs/api.md"
    assert documented - code == set(), "in docs/api.md, read by no code"


NUMERIC_EDGE_SETTINGS = sorted(name for name, f in GatewaySettings.model_fields.items()
                               if isinstance(f.default, int | float) and not isinstance(f.default, bool))


@pytest.mark.parametrize("field", NUMERIC_EDGE_SETTINGS)
def test_api_md_edge_defaults_are_the_settings(field: str) -> None:
    """The edge table's default of each numeric setting is GatewaySettings' (the variable load() reads)."""
    default = GatewaySettings.model_fields[field].default
    variable = GatewaySettings.variable(field)
    edge = API_MD.split("Edge (`python -m gateway`):", 1)[1].split("\n\n", 2)[1]
    row = next((line for line in edge.splitlines() if f"`{variable}`" in line), None)
    assert row is not None, f"{variable} is not in the edge's table"
    numbers = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", row.split("|")[2])}
    assert float(default) in numbers, (variable, default, row)


def test_api_md_names_every_route() -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = create_app(GatewaySettings(jwt_secret="x" * 32, session_addr=dead, moderation_addr=dead, worker_addr=dead))
    routes = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.method != hdrs.METH_HEAD}
    missing = sorted(f"{method} {path}" for method, path in routes if f"`{method} {path}`" not in API_MD)
    assert not missing


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", ["docs/api.md", "README.md"])
def test_api_md_links_resolve(document: str) -> None:
    path = REPO / document
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, link
