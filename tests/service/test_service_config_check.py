"""``packetstack config check``: every problem of a config file with its line, the line
locator behind it, and agreement with what ``load`` accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import clean_env, cli_command

from packetstack import ConfigError, Service
from packetstack.cli import main
from packetstack.service.config import load
from packetstack.service.configcheck import Locator, Problem, check, check_text


def write(tmp_path: Path, text: str, name: str = "ps.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lines_of(problems: list[Problem]) -> list[int | None]:
    return [problem.line for problem in problems]


def only(text: str) -> Problem:
    problems = check_text(text)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------ locator


def test_locator_tables_arrays_of_tables_and_dotted_keys() -> None:
    text = (
        "# comment = not a key\n"  # 1
        "top = 1\n"  # 2
        "[service]\n"  # 3
        "port = 7400  # trailing = comment\n"  # 4
        'tokens = [\n  "a",\n  # between\n  "b",\n]\n'  # 5-9
        "[[service.principals]]\n"  # 10
        "name = 'x'\n"  # 11
        "[[ service . principals ]]\n"  # 12
        '"name" = "y"\n'  # 13
        "limits.max = 3\n"  # 14
        "[service.principals.extra]\n"  # 15
        "a = { b = 1, c = [1, 2] }\n"  # 16
    )
    lines = Locator(text).run()
    assert lines[("top",)] == 2
    assert lines[("service",)] == 3
    assert lines[("service", "port")] == 4
    assert lines[("service", "tokens")] == 5
    assert lines[("service", "tokens", 0)] == 6
    assert lines[("service", "tokens", 1)] == 8
    assert lines[("service", "principals")] == 10
    assert lines[("service", "principals", 0)] == 10
    assert lines[("service", "principals", 0, "name")] == 11
    assert lines[("service", "principals", 1)] == 12
    assert lines[("service", "principals", 1, "name")] == 13
    assert lines[("service", "principals", 1, "limits", "max")] == 14
    # A sub-table of an array of tables belongs to its latest table.
    assert lines[("service", "principals", 1, "extra")] == 15
    assert lines[("service", "principals", 1, "extra", "a", "c", 1)] == 16
    assert ("comment",) not in lines


def test_locator_is_not_fooled_by_strings() -> None:
    text = (
        'a = """\n'  # 1
        "port = 5\n"  # 2
        "[service]\n"  # 3
        '\\""" still inside\n'  # 4: an escaped quote does not end it
        '"""\n'  # 5
        "b = '''\n[x]\nc = 1'''\n"  # 6-8
        'd = "# not a comment = [" \n'  # 9
        "e = 'C:\\path\\'\n"  # 10: literal strings have no escapes
        "port = 1\n"  # 11
        'f = """two quotes at the end"""""\n'  # 12
        "g = 1979-05-27 07:32:00Z\n"  # 13
    )
    lines = Locator(text).run()
    assert lines == {
        ("a",): 1,
        ("b",): 6,
        ("d",): 9,
        ("e",): 10,
        ("port",): 11,
        ("f",): 12,
        ("g",): 13,
    }


def test_locator_quoted_keys_and_inline_tables_in_arrays() -> None:
    text = (
        '"service".port = 1\n'  # 1
        "service.'tls cert' = 'x'\n"  # 2
        "service.principals = [\n"  # 3
        '  { name = "a", token = "t" },\n'  # 4
        '  { name = "b",\n'  # 5
        '    token = "u" },\n'  # 6
        "]\n"
    )
    lines = Locator(text).run()
    assert lines[("service", "port")] == 1
    assert lines[("service", "tls cert")] == 2
    assert lines[("service", "principals", 0, "token")] == 4
    assert lines[("service", "principals", 1)] == 5
    assert lines[("service", "principals", 1, "token")] == 6


def test_locator_keeps_what_it_found_on_broken_text() -> None:
    assert Locator('a = 1\nb = "unterminated\nc = 2\n').run() == {("a",): 1, ("b",): 2}
    assert Locator("[[a]\n").run() == {}


# --------------------------------------------------------------- good files


GOOD = """\
# a service with every kind of setting
[service]
host = "0.0.0.0"
port = 7400
unix_path = "/run/ps.sock"
tokens = ["operator-token"]
tls_cert = "cert.pem"
tls_key = "key.pem"
heartbeat = 2
heartbeat_timeout = 6.0
mailbox_overflow = "drop-oldest"

[[service.principals]]
name = "workers"
token = "worker-token"
endings = ["worker-*"]
send = ["collector"]
max_connections = 50
"""


def test_good_file_has_no_problems(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert check(path) == []
    load(path, environ={})  # and load agrees


def test_empty_file_and_top_level_settings_are_fine(tmp_path: Path) -> None:
    assert check(write(tmp_path, "")) == []
    assert check(write(tmp_path, "port = 7401\ndata_dir = 'd'\n")) == []


def test_good_file_cli_prints_ok_and_a_summary(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = CliRunner().invoke(main, ["config", "check", str(path)], env=clean_env())
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()
    assert first == f"ok: {path}"
    assert "pss://0.0.0.0:7400" in second and "unix:///run/ps.sock" in second
    assert "principals: 2" in second and "TLS: on" in second
    assert "data_dir: packetstack-data" in second
    assert "token" not in second.replace("tokens", "")  # no secret in the summary


def test_summary_of_an_open_service(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "check", str(write(tmp_path, "port = 1\n"))])
    assert result.exit_code == 0, result.output
    assert "ps://127.0.0.1:1;" in result.output
    assert "principals: none, open" in result.output and "TLS: off" in result.output


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[service]\nport = 1\nhartbeat = 1.0\n", 3, ["'hartbeat'", "did you mean 'heartbeat'"]),
        ("colour = 'red'\n", 1, ["unknown setting 'colour'"]),
        ("\n\nport = 'high'\n", 3, ["port", "Expected `int`, got `str`"]),
        ("tokens = 'abc'\n", 1, ["tokens", "Expected `array`"]),
        ("mailbox_overflow = 'never'\n", 1, ["mailbox_overflow", "'never'"]),
        ("store_synchronous = 'full'\n", 1, ["store_synchronous"]),
        ("[service]\n\nport = 70000\n", 3, ["port 70000 is not between 0 and 65535"]),
        ("heartbeat = 1.0\nheartbeat_timeout = 1.5\n", 1, ["heartbeat_timeout at least twice"]),
        ("heartbeat_timeout = 6.0\n", 1, ["heartbeat_timeout at least twice"]),
        ("\nchunk_size = 100\n", 2, ["chunk_size must be at least 1024"]),
        ("low_water = 10\nhigh_water = 5\n", 1, ["low_water must not exceed high_water"]),
        ("rate_burst = -1\n", 1, ["rate_limit and rate_burst"]),
        ("max_connections = 0\n", 1, ["max_connections must be at least 1"]),
        ("\ntls_key = 'k.pem'\n", 2, ["tls_cert and tls_key go together"]),
        ("host = '0.0.0.0'\n", 1, ["host '0.0.0.0' is not loopback", "allow_open"]),
        ("service = 'main'\n", 1, ["'service' must be a table"]),
        ("port = 1\n[service]\nhost = '::1'\n", 1, ["'port' is ignored", "[service]"]),
        ("[service.grid]\nsize = 1\n", 1, ["unknown setting 'grid'"]),
        ("[service]\nprincipals = 'all'\n", 2, ["principals must be an array of tables"]),
    ],
)
def test_each_problem_at_its_line(text: str, line: int, words: list[str], tmp_path: Path) -> None:
    problem = only(text)
    assert problem.line == line, problem
    for word in words:
        assert word in problem.message, problem
    # What the check refuses, loading refuses too (or, for ignored keys, silently drops).
    if "ignored" not in problem.message and "loopback" not in problem.message:
        with pytest.raises(ConfigError):
            load(write(tmp_path, text), environ={})


def test_open_service_beyond_loopback_is_fine_with_allow_open_or_a_principal() -> None:
    assert check_text("host = '0.0.0.0'\nallow_open = true\n") == []
    assert check_text("host = '::'\n[[principals]]\nname = 'a'\ntoken = 't'\n") == []
    assert check_text("host = '::'\ntokens = ['t']\n") == []


PRINCIPALS = """\
[service]
tokens = ["shared", ""]

[[service.principals]]
name = "a"
token = "shared"
endings = "worker-*"
sned = ["x"]

[[service.principals]]
endings = ["b-*"]

[[service.principals]]
name = "a"
token = "other"
colour = 1
"""


def test_principal_problems_each_at_its_line() -> None:
    problems = check_text(PRINCIPALS)
    assert [(p.line, p.message) for p in problems] == [
        (2, "tokens[1]: the token is empty"),
        (6, "principal 'a' has the same token as tokens[0] (line 2)"),
        (7, "principal 'a': endings: Expected `array`, got `str`"),
        (8, "principal 'a': unknown key 'sned' (did you mean 'send'?)"),
        (10, "principal #2 has no name"),
        (10, "principal #2 has no token or certificate"),
        (13, "principal 'a': another principal has that name (line 4)"),
        (16, "principal 'a': unknown key 'colour'"),
    ]
    assert all("shared" not in p.message and "'other'" not in p.message for p in problems)


def test_inline_principals_are_located_too() -> None:
    problems = check_text('principals = [\n  {name = "a"},\n  {token = "t", nmae = "b"},\n]\n')
    assert [(p.line, p.message) for p in problems] == [
        (2, "principal 'a' has no token or certificate"),
        (3, "principal #2: unknown key 'nmae' (did you mean 'name'?)"),
        (3, "principal #2 has no name"),
    ]


def test_several_problems_all_reported_in_line_order() -> None:
    text = (
        "[service]\n"  # 1
        "prot = 7400\n"  # 2
        "heartbeat = 'fast'\n"  # 3
        "heartbeat_timeout = 1.0\n"  # 4: not judged against the default heartbeat
        "low_water = 9\n"  # 5
        "high_water = 1\n"  # 6
        "tls_cert = 'c.pem'\n"  # 7
        "max_connections = 0\n"  # 8
        "mailbox_ttl = 0\n"  # 9
    )
    problems = check_text(text)
    assert lines_of(problems) == [2, 3, 5, 7, 8, 9]
    assert "did you mean 'port'" in problems[0].message
    assert all("heartbeat_timeout" not in p.message for p in problems)


def test_a_problem_whose_line_cannot_be_found_says_so() -> None:
    # A rule naming no setting the file sets (here: none at all) cannot be placed.
    from packetstack.service.configcheck import _Checker

    checker = _Checker({}, {})
    checker.at(("nowhere",), "something is wrong")
    assert checker.problems == [Problem(None, "something is wrong (line not found)")]
    assert checker.problems[0].format("f.toml") == "f.toml: something is wrong (line not found)"


def test_invalid_toml_passes_tomllib_position_through() -> None:
    problem = only("port = 1\nhost = = 2\n")
    assert problem.line == 2
    assert problem.message.startswith("invalid TOML: ")
    assert "(at line 2, column 8)" in problem.message
    assert only("[service\nport = 1\n").line == 1
    duplicate = only("port = 1\n\nport = 2\n")
    assert "Cannot overwrite a value" in duplicate.message
    unterminated = only("a = 1\nb = '''open\n\n")  # tomllib: "(at end of document)"
    assert unterminated.line == 3 and "end of document" in unterminated.message


def test_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('port = 1\ndata_dir = "caf\u00e9"\n'.encode("latin-1"))
    [problem] = check(path)
    assert problem.line == 2 and "UTF-8" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    [problem] = check(tmp_path / "missing.toml")
    assert problem.line is None and "cannot read" in problem.message


# ---------------------------------------------------------------- the command


def test_cli_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, "hartbeat = 1\nport = 70000\n")
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{path}:1: unknown setting 'hartbeat' (did you mean 'heartbeat'?)",
        f"{path}:2: port 70000 is not between 0 and 65535",
    ]


def test_cli_invalid_toml_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\nport = 7400\nport = 7401\n")
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"{path}:") and "invalid TOML" in result.output


def test_cli_missing_file_exits_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1
    assert "nope.toml: cannot read the file" in result.output


def test_cli_ignores_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 7401\n")
    result = CliRunner().invoke(
        main, ["config", "check", str(path)], env={"PACKETSTACK_PORT": "99999"}
    )
    assert result.exit_code == 0, result.output
    assert ":7401" in result.output


def test_config_check_as_a_real_process(tmp_path: Path) -> None:
    bad = write(tmp_path, "port = 'x'\n", "bad.toml")
    good = write(tmp_path, GOOD, "good.toml")
    run = [cli_command("config", "check", str(p)) for p in (bad, good)]
    results = [
        subprocess.run(args, capture_output=True, text=True, timeout=60, env=clean_env())
        for args in run
    ]
    assert [r.returncode for r in results] == [1, 0], [r.stdout + r.stderr for r in results]
    assert results[0].stdout.startswith(f"{bad}:1: port:")
    assert results[1].stdout.startswith(f"ok: {good}\n")
    assert "Traceback" not in results[0].stderr + results[1].stderr


# ---------------------------------------------------------- database bridges


BRIDGES = """\
[service]
flush_interval = 60

[service.bridges.pg]
url = "postgresql+asyncpg://app:pg-secret@db.example.com:5432/app"
batch = 500
retries = 5
retry_delay = 0.25
retry_max_delay = 10
connect_timeout = 3

[service.bridges.docs]
url = "mongodb://app:mongo-secret@mongo-1:27017,mongo-2:27017/app?replicaSet=rs0"

[service.bridges.atlas]
url = "mongodb+srv://cluster0.example.net/"
database = "app"

[service.bridges.local]
url = "sqlite+aiosqlite:///var/lib/app/app.db"

[service.maps.players]
bridge = "pg"
mode = "typed"
type = "myapp.models:Player"
load = "eager"

[service.maps.sessions]
bridge = "docs"
key = "tuple"
load = "lazy"

[service.maps.scores]
bridge = "pg"
table = "player_scores"
key = "int"
key_column = "player_id"
value_column = "data"

[service.maps.cache]
bridge = "local"
key = "bytes"
"""


def test_good_bridges_and_maps_have_no_problems(tmp_path: Path) -> None:
    path = write(tmp_path, BRIDGES)
    assert check(path) == []
    config = load(path, environ={})  # and load agrees
    assert sorted(config.bridges) == ["atlas", "docs", "local", "pg"]
    assert config.maps["scores"].key_column == "player_id"


def test_bridges_and_maps_at_the_top_level_and_inline() -> None:
    text = (
        'bridges.pg = { url = "postgresql+asyncpg://db/app", batch = 10 }\n'
        "maps = { players = { bridge = 'pg' }, scores = { bridge = 'pg', tabel = 's' } }\n"
    )
    assert [(p.line, p.message) for p in check_text(text)] == [
        (2, "maps.scores: unknown key 'tabel' (did you mean 'table'?)"),
    ]


def test_good_bridges_cli_summary_names_them_without_their_urls(tmp_path: Path) -> None:
    path = write(tmp_path, BRIDGES)
    result = CliRunner().invoke(main, ["config", "check", str(path)], env=clean_env())
    assert result.exit_code == 0, result.output
    summary = result.output.splitlines()[1]
    assert (
        "bridges: pg (postgresql+asyncpg: players, scores), docs (mongodb: sessions), "
        "atlas (mongodb+srv: no maps), local (sqlite+aiosqlite: cache); "
        "flush: every 60 s and on close"
    ) in summary
    assert "secret" not in result.output and "db.example.com" not in result.output


B = "[bridges.b]\nurl = 'sqlite+aiosqlite://'\n"  # a bridge for the maps below


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        # what loading refuses too
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\nbatch = 0\n", 3, ["bridges.pg: batch"]),
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\n\nretries = 0\n", 4, ["retries must be"]),
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\nretry_delay = 60\n", 3, ["retry_delay"]),
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\nconnect_timeout = 0\n", 3, ["connect_t"]),
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\nbatch = 'many'\n", 3, ["pg.batch: Expected"]),
        ("[bridges.pg]\nurl = 'sqlite+aiosqlite://'\nurl_ = 1\n", 3, ["did you mean 'url'"]),
        ("[bridges.pg]\nbatch = 1\n", 1, ["bridges.pg has no url"]),
        ("[service]\nbridges = 'pg'\n", 2, ["bridges must be a table of tables"]),
        ("[bridges]\npg = 'sqlite://'\n", 2, ["bridges.pg must be a table ([bridges.pg])"]),
        ("flush_interval = -1\n", 1, ["flush_interval must be >= 0"]),
        ("[maps.m]\nbridge = 'pg'\n", 2, ["maps.m.bridge = 'pg' names no [bridges.pg]"]),
        ("[maps.m]\ntable = 't'\n", 1, ["maps.m has no bridge"]),
        ("[maps.m]\nbridge = 'b'\nmode = 'sql'\n" + B, 3, ["maps.m.mode", "'document', 'typed'"]),
        ("[maps.m]\nbridge = 'b'\nkey = 'float'\n" + B, 3, ["maps.m.key", "'str', 'int'"]),
        ("[maps.m]\nbridge = 'b'\nload = 'soon'\n" + B, 3, ["maps.m.load", "'eager', 'lazy'"]),
        ("[maps.m]\nbridge = 'b'\nlaod = 'eager'\n" + B, 3, ["did you mean 'load'"]),
        # what only the service's start refuses (nothing is imported or connected here)
        ("[maps.m]\nbridge = 'b'\nmode = 'typed'\n" + B, 3, ["mode 'typed'", "type = 'module:"]),
        ("[maps.m]\nbridge = 'b'\ntype = 'Player'\n" + B, 3, ["maps.m.type must be 'module:Name'"]),
        ("[maps.m]\nbridge = 'b'\ntype = 5\n" + B, 3, ["maps.m.type must be 'module:Name'"]),
        ("[bridges.b]\nurl = 'http://u:p@h/db'\n", 2, ["'http' is not a SQL or MongoDB URL"]),
        ("[bridges.b]\nurl = 'db.example.com'\n", 2, ["bridges.b.url is not a database URL"]),
        ("[bridges.b]\nurl = 'mongodb://h:27017'\n", 2, ["name the MongoDB database"]),
        ("[bridges.b]\nurl = 'postgresql://u:p@h/db'\n", 2, ["postgresql+asyncpg://"]),
        ("[bridges.b]\nurl = 'mysql+asyncmy://u:p@h:x/db'\n", 2, ["host and port do not parse"]),
        ("[bridges.b]\nurl = 'mysql+asyncmy://u:p/w@h/db'\n", 2, ["percent-encode"]),
        ("[bridges.pg]\nurl = 'x'\n[service]\n", 1, ["'bridges' is ignored", "[service.bridges"]),
    ],
)
def test_each_bridge_problem_at_its_line(text: str, line: int, words: list[str]) -> None:
    problem = only(text)
    assert problem.line == line, problem
    for word in words:
        assert word in problem.message, problem
    assert "u:p" not in problem.message  # a URL is never shown: it may hold a password


@pytest.mark.parametrize(
    "text",
    [
        "[bridges.b]\nurl = 'sqlite+aiosqlite://'\nbatch = 0\n",
        "flush_interval = -1\n",
        "[maps.m]\nbridge = 'b'\n",
        "[maps.m]\nbridge = 'b'\nload = 'soon'\n",
    ],
)
def test_bridge_problems_load_refuses_too(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    "text",
    [
        "[bridges.b]\nurl = 'sqlite+aiosqlite://'\n[maps.m]\nbridge = 'b'\nmode = 'typed'\n",
        "[bridges.b]\nurl = 'sqlite+aiosqlite://'\n[maps.m]\nbridge = 'b'\ntype = 'nomodule'\n",
        "[bridges.b]\nurl = 'http://h/db'\n",
        "[bridges.b]\nurl = 'mongodb://h:27017'\n",
    ],
)
def test_bridge_problems_only_the_start_finds_are_refused_by_the_service(
    text: str, tmp_path: Path
) -> None:
    assert len(check_text(text)) == 1
    config = load(write(tmp_path, text), environ={})  # loading does not look so far
    with pytest.raises(ConfigError):
        Service(config=config, data_dir=tmp_path / "data")


BAD_BRIDGES = """\
[service]
[service.bridges.pg]
url = "postgresql://app:pg-secret@db/app"
batch = 500
retries = 0
pasword = "pg-secret"

[service.bridges.lite]
url = "sqlite+aiosqlite:///app.db"
retry_delay = "fast"
retry_max_delay = 0.1

[service.maps.players]
bridge = "pg"
mode = "typed"

[service.maps.scores]
bridge = "nowhere"
table = "Players"

[service.maps.events]
bridge = "lite"
tpye = "app:Event"
"""


def test_bridge_problems_each_at_its_line() -> None:
    problems = check_text(BAD_BRIDGES)
    assert [(p.line, p.message) for p in problems] == [
        (
            3,
            "bridges.pg.url: postgresql:// names no driver; the bridges use an asyncio one: "
            "postgresql+asyncpg://",
        ),
        (5, "bridges.pg: batch and retries must be at least 1"),  # retries', not batch's line
        (6, "bridges.pg: unknown key 'pasword'"),
        (10, "bridges.lite.retry_delay: Expected `float`, got `str`"),
        # not "retry_delay must be <= retry_max_delay": it would judge the default delay
        (
            15,
            "maps.players: mode 'typed' makes columns of a msgspec.Struct's fields: set type = "
            "'module:StructName', or use mode = 'document'",
        ),
        (18, "maps.scores.bridge = 'nowhere' names no [bridges.nowhere] (lite, pg)"),
        (23, "maps.events: unknown key 'tpye' (did you mean 'type'?)"),
    ]
    assert all("secret" not in p.message for p in problems)


def test_two_maps_of_a_bridge_in_one_table() -> None:
    text = (
        "[bridges.b]\n"  # 1
        "url = 'sqlite+aiosqlite:///app.db'\n"  # 2
        "[bridges.c]\n"  # 3
        "url = 'sqlite+aiosqlite:///other.db'\n"  # 4
        "[maps.players]\n"  # 5
        "bridge = 'b'\n"  # 6
        "[maps.ranks]\n"  # 7
        "bridge = 'b'\n"  # 8
        "table = 'PLAYERS'\n"  # 9: SQLite's names know no case
        "[maps.elsewhere]\n"  # 10
        "bridge = 'c'\n"  # 11
        "table = 'players'\n"  # 12: another database: fine
    )
    assert [(p.line, p.message) for p in check_text(text)] == [
        (
            9,
            "maps.ranks: table 'PLAYERS' of bridge 'b' is maps.players's too (line 5): "
            "give each map a table of its own",
        )
    ]


def test_maps_are_not_judged_against_bridges_that_are_not_tables() -> None:
    # bridges is refused: a map naming one of them is not "names no [bridges.pg]" on top.
    assert [
        (p.line, p.message) for p in check_text("bridges = 'pg'\n[maps.m]\nbridge = 'pg'\n")
    ] == [(1, "bridges must be a table of tables ([bridges.NAME])")]
