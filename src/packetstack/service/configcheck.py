"""``packetstack config check FILE``: every problem of a TOML config file, each with its line.

tomllib says where a syntax error is, but not where a value came from. So a valid document is
read twice: by tomllib for the values, and by :class:`Locator`, a small scanner that follows
TOML's structure (table headers, arrays of tables, dotted and quoted keys, strings of every
kind, arrays and inline tables across lines) only to note the line each key and array element
starts on. A problem whose line cannot be found says so instead of guessing one.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .auth import Principal
from .config import ServiceConfig, SettingProblems, _fields, exposure_problem

Key = tuple[str | int, ...]  # a path into the document: table and key names, array indexes

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\n#]*")  # numbers, booleans, dates: up to what ends a value
_SYNTAX_AT = re.compile(r"\(at line (\d+), column \d+\)")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, at ``line`` (1-based). None: the whole file
    (it cannot be read), or a line that could not be found, which the message says."""

    line: int | None
    message: str

    def format(self, path: str) -> str:
        return (
            f"{path}: {self.message}"
            if self.line is None
            else f"{path}:{self.line}: {self.message}"
        )


class Locator:
    """The line each key, table and array element of a TOML document starts on.

    ``Locator(text).run()`` maps paths such as ``("service", "port")``,
    ``("service", "principals", 1, "token")`` (the second ``[[service.principals]]``) or
    ``("service", "tokens", 0)`` to line numbers. Meant for text tomllib accepted: on
    anything else it stops quietly, keeping what it found so far.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Key, int] = {}
        self._tables_in_array: dict[Key, int] = {}  # [[path]] -> tables so far

    def run(self) -> dict[Key, int]:
        table: Key = ()
        try:
            while True:
                self._skip(newlines=True)
                if self.pos >= len(self.text):
                    break
                if self.text.startswith("[", self.pos):
                    table = self._header()
                else:
                    self._pair(table)
                    self._skip()
        except (IndexError, ValueError):
            pass  # not valid TOML after all: keep what was found
        return self.lines

    @property
    def _line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def _note(self, path: Key, line: int) -> None:
        self.lines.setdefault(path, line)

    def _skip(self, newlines: bool = False) -> None:
        """Past blanks and comments (and line ends, when ``newlines``)."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at offset {self.pos}")
        self.pos += len(token)

    def _header(self) -> Key:
        line = self._line
        array = self.text.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        keys = self._key()
        self._expect("]]" if array else "]")
        # Keys that lead through an array of tables go into its latest table.
        path: Key = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            if i < len(keys) - 1 and path in self._tables_in_array:
                path = (*path, self._tables_in_array[path] - 1)
        if array:
            index = self._tables_in_array.get(path, 0)
            self._tables_in_array[path] = index + 1
            self._note(path, line)
            path = (*path, index)
        self._note(path, line)
        return path

    def _pair(self, table: Key) -> None:
        line = self._line
        keys = self._key()
        self._expect("=")
        for end in range(1, len(keys) + 1):
            self._note((*table, *keys[:end]), line)
        self._value((*table, *keys))

    def _key(self) -> Key:
        keys: list[str] = []
        while True:
            self._skip()
            if self.text[self.pos] in "\"'":
                start = self.pos
                self._string()
                keys.append(tomllib.loads(f"k = {self.text[start : self.pos]}")["k"])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    raise ValueError(f"no key at offset {self.pos}")
                keys.append(match.group())
                self.pos = match.end()
            self._skip()
            if not self.text.startswith(".", self.pos):
                return tuple(keys)
            self.pos += 1

    def _value(self, path: Key) -> None:
        self._skip()
        char = self.text[self.pos]
        if char in "\"'":
            self._string()
        elif char in "[{":
            self._container(path, char)
        else:
            match = _SCALAR.match(self.text, self.pos)
            assert match is not None  # it matches the empty string
            self.pos = match.end()

    def _container(self, path: Key, opening: str) -> None:
        """An array (elements noted by index) or an inline table (keys noted by name)."""
        closing = "]" if opening == "[" else "}"
        self.pos += 1
        index = 0
        while True:
            self._skip(newlines=True)
            if self.text[self.pos] == closing:
                self.pos += 1
                return
            line = self._line
            if opening == "[":
                self._note((*path, index), line)
                self._value((*path, index))
                index += 1
            else:
                self._pair(path)
            self._skip(newlines=True)
            if self.text[self.pos] != ",":
                self._expect(closing)
                return
            self.pos += 1

    def _string(self) -> None:
        text = self.text
        for quotes in ('"""', "'''"):
            if text.startswith(quotes, self.pos):
                end = text.index(quotes, self.pos + 3)  # ValueError when unterminated
                while quotes == '"""' and _escaped(text, end):
                    end = text.index(quotes, end + 1)
                end += 3
                for _ in range(2):  # up to two quotes just before the end are content
                    if text.startswith(quotes[0], end):
                        end += 1
                self.pos = end
                return
        quote = text[self.pos]
        end = self.pos + 1
        while text[end] != quote:  # IndexError when unterminated
            end += 2 if quote == '"' and text[end] == "\\" else 1
        self.pos = end + 1


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` follows an odd number of backslashes."""
    slashes = 0
    while index - slashes - 1 >= 0 and text[index - slashes - 1] == "\\":
        slashes += 1
    return slashes % 2 == 1


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_PRINCIPAL_FIELDS = {f.name: f.type for f in msgspec.structs.fields(Principal)}
_SERVICE = ("service",)


class _Checker:
    def __init__(self, data: dict[str, Any], lines: dict[Key, int]) -> None:
        self.data = data
        self.lines = lines
        self.problems: list[Problem] = []

    def at(self, path: Key | None, message: str) -> None:
        line = None if path is None else self.lines.get(path)
        self.problems.append(Problem(line, message if line else f"{message} (line not found)"))

    def run(self) -> list[Problem]:
        data = self.data
        base: Key = ()
        section = data
        if "service" in data:
            section, base = data["service"], _SERVICE
            if not isinstance(section, dict):
                kind = type(section).__name__
                self.at(_SERVICE, f"'service' must be a table ([service]), not a {kind}")
                return self.problems
            for key in data:
                if key != "service":
                    self.at((key,), f"{key!r} is ignored: only the [service] table is read")
        fields = _fields()
        good: dict[str, Any] = {}
        bad: set[str] = set()
        for key, value in section.items():
            path = (*base, key)
            if key not in fields:
                self.at(path, f"unknown setting {key!r}{_suggest(key, list(fields))}")
            elif key == "principals":
                if not self._principals(value, path):
                    bad.add(key)
            elif self._typed(path, key, value, fields[key], good):
                continue
            else:
                bad.add(key)
        principals = section.get("principals")
        self._tokens(base, good, principals)
        self._certificates(base, section, principals)
        config = self._settings(base, good, bad)
        if config is not None and bad.isdisjoint({"tokens", "principals"}):
            exposure = exposure_problem(
                config.host, config.allow_open, bool(config.tokens or principals)
            )
            if exposure is not None:
                self.at((*base, "host"), exposure)
        return self.problems

    def _typed(self, path: Key, key: str, value: Any, kind: Any, into: dict[str, Any]) -> bool:
        """Convert ``value`` as loading does (``"7400"`` is a port); say why not if not."""
        try:
            into[key] = msgspec.convert(value, kind, strict=False)
        except msgspec.ValidationError as exc:
            self.at(path, f"{key}: {exc}")  # the value itself is not shown: it may be a secret
            return False
        return True

    def _principals(self, value: Any, path: Key) -> bool:
        if not isinstance(value, list):
            header = ".".join(str(key) for key in path)
            self.at(path, f"principals must be an array of tables ([[{header}]])")
            return False
        count = len(self.problems)
        names: dict[str, int] = {}
        for index, entry in enumerate(value):
            entry_path = (*path, index)
            if not isinstance(entry, dict):
                self.at(entry_path, f"principal #{index + 1} must be a table")
                continue
            name = entry.get("name")
            label = _label(entry, index)
            checked: dict[str, Any] = {}
            for key, item in entry.items():
                if key not in _PRINCIPAL_FIELDS:
                    suggestion = _suggest(key, list(_PRINCIPAL_FIELDS))
                    self.at((*entry_path, key), f"{label}: unknown key {key!r}{suggestion}")
                else:
                    self._typed(
                        (*entry_path, key), f"{label}: {key}", item, _PRINCIPAL_FIELDS[key], checked
                    )
            if "name" not in entry:
                self.at(entry_path, f"{label} has no name")
            elif isinstance(name, str) and name in names:
                first = self.lines.get((*path, names[name]))
                where = f" (line {first})" if first else ""
                self.at(entry_path, f"{label}: another principal has that name{where}")
            elif isinstance(name, str):
                names[name] = index
            if "token" not in entry and "certificate" not in entry:
                self.at(entry_path, f"{label} has no token or certificate")
        return len(self.problems) == count

    def _tokens(self, base: Key, good: dict[str, Any], principals: Any) -> None:
        """Every token non-empty and used once, whether bare or a principal's (a principal
        with a certificate pattern may leave its token empty)."""
        seen: dict[str, str] = {}
        owners: list[tuple[Key, str, Any]] = [
            ((*base, "tokens", i), f"tokens[{i}]", token)
            for i, token in enumerate(good.get("tokens", []))
        ]
        if isinstance(principals, list):
            for i, entry in enumerate(principals):
                # An empty token is fine beside a certificate pattern: that one identifies.
                if isinstance(entry, dict) and "token" in entry and not entry.get("certificate"):
                    path = (*base, "principals", i, "token")
                    owners.append((path, _label(entry, i), entry["token"]))
        for path, label, token in owners:
            if not isinstance(token, str):
                continue
            if not token:
                self.at(path, f"{label}: the token is empty")
            elif token in seen:
                self.at(path, f"{label} has the same token as {seen[token]}")
            else:
                line = self.lines.get(path)
                seen[token] = f"{label} (line {line})" if line else label

    def _certificates(self, base: Key, section: dict[str, Any], principals: Any) -> None:
        """Certificate patterns need a service that asks for client certificates."""
        if "tls_client_ca" in section or not isinstance(principals, list):
            return
        for i, entry in enumerate(principals):
            if isinstance(entry, dict) and entry.get("certificate"):
                self.at(
                    (*base, "principals", i, "certificate"),
                    f"{_label(entry, i)}: its certificate pattern can match nothing: the "
                    "service asks for client certificates only with tls_client_ca",
                )

    def _settings(self, base: Key, good: dict[str, Any], bad: set[str]) -> ServiceConfig | None:
        """ServiceConfig's own checks, each at the line of the setting it names first
        among those the file sets. A check naming a setting of the wrong type is left
        out: it would judge the default, not the file. The settings, if they pass."""
        values = dict(good, principals=[])  # checked above, entry by entry
        values["tokens"] = [token for token in good.get("tokens", []) if token]
        values["tokens"] = list(dict.fromkeys(values["tokens"]))  # reported above
        try:
            return msgspec.convert(values, ServiceConfig, strict=False)
        except msgspec.ValidationError as exc:
            cause = exc.__cause__
            messages = cause.problems if isinstance(cause, SettingProblems) else [str(exc)]
        for message in messages:
            named = sorted(
                (key for key in _fields() if _names(message, key)),
                key=lambda key: _names(message, key),
            )
            if bad.intersection(named):
                continue
            in_file = [key for key in named if key in good]
            self.at((*base, in_file[0]) if in_file else None, message)
        return None


def _label(principal: dict[str, Any], index: int) -> str:
    name = principal.get("name")
    return f"principal {name!r}" if isinstance(name, str) else f"principal #{index + 1}"


def _names(message: str, key: str) -> int:
    """Where ``message`` names the setting ``key`` as a word (its offset + 1), or 0."""
    found = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)
    return found.start() + 1 if found else 0


def check_text(text: str) -> list[Problem]:
    """Every problem of a config document, in line order (unknown lines last)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _SYNTAX_AT.search(str(exc))
        line = int(found.group(1)) if found else max(1, len(text.splitlines()))  # at the end
        return [Problem(line, f"invalid TOML: {exc}")]
    problems = _Checker(data, Locator(text).run()).run()
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def check(path: str | Path) -> list[Problem]:
    """Every problem of the config file at ``path``: what ``load`` would refuse (each
    failed check on its own), keys it would ignore, and an open service beyond loopback."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return [Problem(None, f"cannot read the file: {exc.strerror or exc}")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return [Problem(line, f"not UTF-8 (byte {raw[exc.start]:#04x}); TOML files are UTF-8")]
    return check_text(text)


def summary(config: ServiceConfig) -> str:
    """One line: where it listens, who may connect, TLS, the data directory."""
    scheme = "pss" if config.tls_cert else "ps"
    listeners = [f"{scheme}://{config.host}:{config.port}"]
    if config.unix_path is not None:
        listeners.append(f"unix://{config.unix_path}")
    count = len(config.tokens) + len(config.principals)
    who = (
        f"{count} ({len(config.tokens)} tokens, {len(config.principals)} [[principals]])"
        if count
        else "none, open" + (" (allow_open)" if config.allow_open else "")
    )
    tls = "on" if config.tls_cert else "off"
    if config.tls_client_ca is not None:
        asked = "required" if config.tls_client_cert_required else "optional"
        tls += f" (client certificates {asked})"
    return (
        f"listeners: {', '.join(listeners)}; principals: {who}; TLS: {tls}; "
        f"data_dir: {config.data_dir}"
    )
