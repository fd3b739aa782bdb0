"""``packetstack config check``: every problem of a config file with its line, the line
locator behind it, and agreement with what ``load`` accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import clean_env, cli_command

from packetstack import ConfigError
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
