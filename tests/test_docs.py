"""The docs cannot drift from the code: their examples run, their config files pass
``packetstack config check``, and their tables name every setting with its real default.

Conventions in the Markdown files (docs/*.md and README.md):

- a ```python block right after a ``<!-- test -->`` line runs as a script on its own (in a
  temporary directory, with a clean environment) and must exit with status 0. Mark the ones
  that stand alone, against an in-process service; the others must still be valid Python;
- a ```python block right after ``<!-- signature -->`` is a call signature and must match the
  real one (names, kinds, defaults);
- every ```toml block must pass ``packetstack config check``;
- a ```text block starting with ``$ packetstack config check FILE`` shows that command's output
  exactly. FILE is a ```toml block of the same page whose first line is ``# FILE...``, or one of
  the broken files in ``BROKEN`` below.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from support import clean_env

import packetstack
from packetstack.cli import main
from packetstack.service.auth import Principal
from packetstack.service.config import ServiceConfig
from packetstack.storage import BridgeSettings, MapBridge

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    marker: str  # the <!-- ... --> line right before it, if any
    text: str

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while not _CLOSE.match(lines[end]):
            end += 1
        previous = lines[index - 1].strip() if index else ""
        marker = previous if previous.startswith("<!--") else ""
        text = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        found.append(Block(page, index + 1, fence.group(2), marker, text))
        index = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def of(lang: str, marker: str | None = None) -> list[Any]:
    return [
        pytest.param(block, id=block.id)
        for block in ALL
        if block.lang == lang and (marker is None or block.marker == marker)
    ]


# ------------------------------------------------------------------ python


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", of("python", "<!-- test -->"))
def test_runnable_example(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}{result.stderr}"


def test_there_are_runnable_examples() -> None:
    marked = {block.page.name for block in ALL if block.marker == "<!-- test -->"}
    assert {"README.md", "SECURITY.md", "CONCEPTS.md", "PROTOCOL.md"} <= marked


@pytest.mark.parametrize("block", of("python"))
def test_every_python_block_is_valid_python(block: Block) -> None:
    if block.marker == "<!-- signature -->":
        return  # checked below
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | ast.PyCF_ONLY_AST
    compile(block.text, block.id, "exec", flags=flags)


@pytest.mark.parametrize("block", of("python", "<!-- signature -->"))
def test_signature_matches_the_code(block: Block) -> None:
    tree = ast.parse(f"def {block.text.strip()}: ...")
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    real = inspect.signature(getattr(packetstack, function.name))
    documented = inspect.Signature(
        [
            inspect.Parameter(name, kind, default=default)
            for name, kind, default in _parameters(function.args)
        ]
    )
    assert [(p.name, p.kind, p.default) for p in documented.parameters.values()] == [
        (p.name, p.kind, p.default) for p in real.parameters.values()
    ], block.id


def _parameters(args: ast.arguments) -> list[tuple[str, Any, Any]]:
    empty = inspect.Parameter.empty
    positional = args.args
    defaults = [empty] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(node) for node in args.defaults
    ]
    found = [
        (arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default)
        for arg, default in zip(positional, defaults, strict=True)
    ]
    found += [
        (arg.arg, inspect.Parameter.KEYWORD_ONLY, empty if node is None else ast.literal_eval(node))
        for arg, node in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg is not None:
        found.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, empty))
    return found


# -------------------------------------------------------------------- TOML


def config_check(folder: Path, name: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["config", "check", name], env=clean_env())
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


@pytest.mark.parametrize("block", of("toml"))
def test_toml_example_passes_config_check(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.toml").write_text(block.text, encoding="utf-8")
    code, output = config_check(tmp_path, "example.toml")
    assert code == 0, f"{block.id}:\n" + "\n".join(output)
    assert output[0] == "ok: example.toml"


# Files the docs show `config check` refusing (a broken file is no ```toml example).
BROKEN = {
    "ps.toml": """\
[service]
tokens = ["shared"]
hartbeat = 1.0
port = 70000
mailbox_overflow = "never"

[[service.principals]]
name = "workers"
token = "shared"

[[service.principals]]
token = "other"
""",
    "bad-bridges.toml": """\
[service]
flush_interval = 60

[service.bridges.pg]
url = "postgresql://app:secret@db.example.com/app"
batch = 0

[service.maps.players]
bridge = "pg"
mode = "typed"

[service.maps.scores]
bridge = "postgres"
load = "always"
""",
}


def _shown_runs() -> list[Any]:
    return [
        pytest.param(block, id=block.id)
        for block in ALL
        if block.lang == "text" and block.text.startswith("$ packetstack config check ")
    ]


@pytest.mark.parametrize("block", _shown_runs())
def test_shown_config_check_output_is_real(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, *shown = block.text.splitlines()
    name = command.removeprefix("$ packetstack config check ")
    files = dict(BROKEN)
    for other in blocks(block.page):
        if other.lang == "toml" and other.text.startswith(f"# {name}"):
            files[name] = other.text
    assert name in files, f"{block.id}: no ```toml block starting with '# {name}'"
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(files[name], encoding="utf-8")
    code, output = config_check(tmp_path, name)
    assert output == shown, block.id
    assert code == (0 if shown[0] == f"ok: {name}" else 1)


# ------------------------------------------------------ the settings tables


def _table(page: Path, header: str) -> dict[str, str]:
    """First column (a `code` name) -> the third (its default) of the table under ``header``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.split("|")[1:4]]
        rows[cells[0].strip("`")] = cells[2]
    return rows


def _documented_default(cell: str) -> Any:
    if cell == "unset":
        return None
    code = re.match(r"`([^`]*)`", cell)
    assert code is not None, f"no `default` in {cell!r}"
    return tomllib.loads(f"v = {code.group(1)}")["v"]


CONFIGURATION = ROOT / "docs" / "CONFIGURATION.md"


def test_every_service_setting_is_documented_with_its_default() -> None:
    rows = _table(CONFIGURATION, "| setting | type | default | CLI flag | meaning |")
    fields = [field.name for field in msgspec.structs.fields(ServiceConfig)]
    assert sorted(rows) == sorted(fields), "CONFIGURATION.md's table and ServiceConfig differ"
    defaults = ServiceConfig()
    for name, cell in rows.items():
        assert _documented_default(cell) == getattr(defaults, name), name


def test_every_principal_key_is_documented_with_its_default() -> None:
    rows = _table(CONFIGURATION, "| key | type | default | meaning |")
    fields = [field.name for field in msgspec.structs.fields(Principal)]
    assert sorted(rows) == sorted(fields), (
        "CONFIGURATION.md's principals table and Principal differ"
    )
    example = Principal(name="x", token="t")
    for name, cell in rows.items():
        if cell == "required":
            assert name in ("name", "token"), name  # no default, or one the checks refuse
        else:
            assert _documented_default(cell) == getattr(example, name), name


@pytest.mark.parametrize(
    ("header", "struct", "example"),
    [
        ("| `[bridges.NAME]` key | type | default | meaning |", BridgeSettings, {"url": "x"}),
        ("| `[maps.NAME]` key | type | default | meaning |", MapBridge, {"bridge": "x"}),
    ],
)
def test_every_bridge_and_map_key_is_documented_with_its_default(
    header: str, struct: type[msgspec.Struct], example: dict[str, str]
) -> None:
    rows = _table(CONFIGURATION, header)
    fields = msgspec.structs.fields(struct)
    assert sorted(rows) == sorted(f.name for f in fields), f"{header} and {struct.__name__} differ"
    defaults = struct(**example)
    for field in fields:
        cell = rows[field.name]
        if field.required:
            assert cell == "required", field.name
        else:
            assert _documented_default(cell) == getattr(defaults, field.name), field.name
