"""`kefu`: one command for the dev tools (`kefu run`, `kefu token`, `kefu accounts`), installed by pyproject.toml."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

USAGE = """usage: kefu COMMAND [ARGS...]

commands:
{commands}

`kefu COMMAND --help` describes a command's arguments."""


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: the module whose `main(argv)` runs it, imported only when it is the one asked for."""

    module: str
    summary: str
    takes_arguments: bool = True
    needs_grpc_code: bool = False
    """Whether it imports the generated kefu/ package (`make proto`); token and accounts do not."""


COMMANDS: dict[str, Command] = {
    "run": Command("devtools.devstack.__main__",
                   "start nats-server, the three services and the edge (what `make run` starts); Ctrl-C stops them",
                   takes_arguments=False, needs_grpc_code=True),
    "token": Command("devtools.mint_token", "mint a dev JWT signed with KEFU_JWT_SECRET (--tenant, --sub, --role)"),
    "accounts": Command("gateway.accounts", "manage the console's agent accounts (add, list, disable, ...)"),
}


def repo_root(candidates: Sequence[Path]) -> Path | None:
    """The first candidate holding kefu's sources."""
    return next((path for path in candidates if (path / "gateway" / "__main__.py").is_file()), None)


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        sys.exit(f"kefu: unknown command {name!r}\n\n{usage()}")
    if not command.takes_arguments and rest:
        if rest in (["-h"], ["--help"]):
            print(f"usage: kefu {name}\n\n{command.summary}; settings come from KEFU_* variables (README.md).")
            return
        sys.exit(f"kefu {name}: takes no arguments (settings come from KEFU_* variables)")
    # The project installs no package but this one (pyproject.toml: processes run from the repository):
    # an editable install finds this file in the repository; an image runs from its working directory.
    root = repo_root([Path(__file__).resolve().parents[1], Path.cwd()])
    if root is None:
        sys.exit("kefu: kefu's sources are not here: run it from an editable install (make venv) or the repository")
    if command.needs_grpc_code and not (root / "kefu").is_dir():
        sys.exit(f"kefu: the gRPC code is not generated yet: run `make proto` in {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    entry: Callable[..., None] = importlib.import_module(command.module).main
    sys.argv[0] = f"kefu {name}"  # argparse's usage lines name the command the user typed
    if command.takes_arguments:
        entry(rest)
    else:
        entry()


if __name__ == "__main__":
    main()
