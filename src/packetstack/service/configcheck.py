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
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

from ..storage.bridge import BridgeSettings, MapBridge
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
        # Keys that lead through an array of tables go into its latest table. A table the
        # header defines on the way (``[bridges.pg]`` defines ``bridges``) starts here too.
        path: Key = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            if i < len(keys) - 1 and path in self._tables_in_array:
                path = (*path, self._tables_in_array[path] - 1)
            if i < len(keys) - 1:
                self._note(path, line)
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


def _choices(kind: Any) -> str:
    """`` (one of 'a', 'b')`` for a Literal type, else nothing."""
    if get_origin(kind) is not Literal:
        return ""
    return " (one of " + ", ".join(repr(choice) for choice in get_args(kind)) + ")"


_PRINCIPAL_FIELDS = {f.name: f.type for f in msgspec.structs.fields(Principal)}
_SERVICE = ("service",)
# [bridges.NAME] and [maps.NAME]: the struct of each table, and its fields by name.
_NAMED: dict[str, type[msgspec.Struct]] = {"bridges": BridgeSettings, "maps": MapBridge}
_NAMED_FIELDS = {
    setting: {f.name: f for f in msgspec.structs.fields(struct)}
    for setting, struct in _NAMED.items()
}
# The SQL databases a bridge reaches, each with the asyncio driver it is used with.
_SQL_DRIVERS = {
    "postgresql": "asyncpg",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
    "sqlite": "aiosqlite",
}
_MONGO_SCHEMES = ("mongodb", "mongodb+srv")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_TYPE_PATH = re.compile(r"[^\W\d][\w.]*:[^\W\d]\w*")  # module:Name


class _Checker:
    def __init__(self, data: dict[str, Any], lines: dict[Key, int]) -> None:
        self.data = data
        self.lines = lines
        self.problems: list[Problem] = []
        # [bridges.NAME] and [maps.NAME] by setting and name: the keys of the right type, and
        # (setting, name, key) of those of a wrong one.
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._broken: set[tuple[str, str, str]] = set()

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
                    where = f" (write [service.{key}.NAME])" if key in _NAMED else ""
                    self.at((key,), f"{key!r} is ignored: only the [service] table is read{where}")
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
            elif key in _NAMED:
                if not self._named(value, path, key, good):
                    bad.add(key)
            elif self._typed(path, key, value, fields[key], good):
                continue
            else:
                bad.add(key)
        principals = section.get("principals")
        self._tokens(base, good, principals)
        self._certificates(base, section, principals)
        self._tables(base)
        config = self._settings(base, good, bad)
        if config is not None and bad.isdisjoint({"tokens", "principals"}):
            exposure = exposure_problem(
                config.host, config.allow_open, bool(config.tokens or principals)
            )
            if exposure is not None:
                self.at((*base, "host"), exposure)
        return self.problems

    def _typed(
        self,
        path: Key,
        key: str,
        value: Any,
        kind: Any,
        into: dict[str, Any],
        label: str | None = None,
    ) -> bool:
        """Convert ``value`` as loading does (``"7400"`` is a port) into ``into[key]``; say
        why not if not (the problem starts with ``label``, by default ``key``)."""
        try:
            into[key] = msgspec.convert(value, kind, strict=False)
        except msgspec.ValidationError as exc:
            # The value itself is not shown: it may be a secret.
            self.at(path, f"{label or key}: {exc}{_choices(kind)}")
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

    def _named(self, value: Any, path: Key, setting: str, into: dict[str, Any]) -> bool:
        """``[bridges.NAME]`` or ``[maps.NAME]`` tables, key by key, and what only the
        service's start would find: a bridge's URL scheme, a map's type. ``into[setting]``
        gets each table with its keys of the right type, for ServiceConfig's checks (a bridge
        without a url gets an empty one; a map without a bridge is left out)."""
        header = ".".join(str(key) for key in path)
        if not isinstance(value, dict):
            self.at(path, f"{setting} must be a table of tables ([{header}.NAME])")
            return False
        fields = _NAMED_FIELDS[setting]
        entries = self._entries[setting] = {}
        for name, entry in value.items():
            entry_path = (*path, name)
            label = f"{setting}.{name}"
            if not isinstance(entry, dict):
                self.at(entry_path, f"{label} must be a table ([{header}.{name}])")
                continue
            checked: dict[str, Any] = {}
            for key, item in entry.items():
                if key not in fields:
                    suggestion = _suggest(key, list(fields))
                    self.at((*entry_path, key), f"{label}: unknown key {key!r}{suggestion}")
                elif not self._typed(
                    (*entry_path, key), key, item, fields[key].type, checked, f"{label}.{key}"
                ):
                    self._broken.add((setting, name, key))
            for key, field in fields.items():
                if field.required and key not in entry:
                    self.at(entry_path, f"{label} has no {key}")
            if setting == "bridges":
                self._url(entry_path, label, checked)
            else:
                self._map_type(entry_path, label, checked)
            entries[name] = checked
        into[setting] = {
            name: {"url": "", **checked} if setting == "bridges" else checked
            for name, checked in entries.items()
            if setting == "bridges" or "bridge" in checked
        }
        return True

    def _url(self, path: Key, label: str, bridge: dict[str, Any]) -> None:
        """A URL the bridges can use: a SQL database with its driver, or MongoDB with a
        database. Nothing is imported or connected, and the URL is never shown (it may hold
        a password)."""
        url = bridge.get("url")
        if url is None:
            return
        at = (*path, "url")
        examples = (
            "postgresql+asyncpg://, mysql+asyncmy://, mariadb+asyncmy://, "
            "sqlite+aiosqlite:///, mongodb://"
        )
        scheme = _URL_SCHEME.match(url)
        if scheme is None:
            self.at(at, f"{label}.url is not a database URL ({examples})")
            return
        dialect, _, driver = scheme.group(1).partition("+")
        if scheme.group(1) in _MONGO_SCHEMES:
            if not urlsplit(url).path.strip("/") and not bridge.get("database"):
                self.at(
                    at,
                    f"{label}: name the MongoDB database in the URL's path "
                    "(mongodb://host/DATABASE) or in database = '...'",
                )
        elif dialect not in _SQL_DRIVERS:
            self.at(
                at, f"{label}.url: {scheme.group(1)!r} is not a SQL or MongoDB URL ({examples})"
            )
        elif not driver:
            self.at(
                at,
                f"{label}.url: {dialect}:// names no driver; the bridges use an asyncio one: "
                f"{dialect}+{_SQL_DRIVERS[dialect]}://",
            )
        elif not _port_parses(url):
            self.at(
                at,
                f"{label}.url: its host and port do not parse (the port is a number up to "
                "65535; percent-encode a / # ? or @ in the user name or password)",
            )

    def _map_type(self, path: Key, label: str, spec: dict[str, Any]) -> None:
        """A map's type, as ``"module:Name"`` (not imported here), which the typed mode needs."""
        kind = spec.get("type")
        if kind is not None and not (isinstance(kind, str) and _TYPE_PATH.fullmatch(kind)):
            self.at(
                (*path, "type"),
                f"{label}.type must be 'module:Name', a class importable where the service runs",
            )
        elif kind is None and spec.get("mode") == "typed":
            self.at(
                (*path, "mode"),
                f"{label}: mode 'typed' makes columns of a msgspec.Struct's fields: set type = "
                "'module:StructName', or use mode = 'document'",
            )

    def _tables(self, base: Key) -> None:
        """Each map of a bridge in a table (or collection) of its own: two would overwrite
        each other's rows. Names are compared regardless of case, as SQLite's are."""
        first: dict[tuple[str, str], str] = {}
        for name, spec in self._entries.get("maps", {}).items():
            if "bridge" not in spec:
                continue
            table = spec.get("table") or name
            other = first.setdefault((spec["bridge"], table.casefold()), name)
            if other == name:
                continue
            line = self.lines.get((*base, "maps", other))
            where = f" (line {line})" if line else ""
            path = (*base, "maps", name, "table") if "table" in spec else (*base, "maps", name)
            self.at(
                path,
                f"maps.{name}: table {table!r} of bridge {spec['bridge']!r} is maps.{other}'s "
                f"too{where}: give each map a table of its own",
            )

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
            entry = self._entry_of(message)
            if entry is not None:
                self._entry_problem(base, *entry, message)
                continue
            in_file = [key for key in named if key in good]
            self.at((*base, in_file[0]) if in_file else None, message)
        return None

    def _entry_of(self, message: str) -> tuple[str, str] | None:
        """The [bridges.NAME] or [maps.NAME] table a ServiceConfig check is about, if any."""
        about = [
            (setting, name)
            for setting, entries in self._entries.items()
            for name in entries
            if re.match(rf"{re.escape(setting)}\.{re.escape(name)}(?![\w-])", message)
        ]
        return max(about, key=lambda entry: len(entry[1]), default=None)

    def _entry_problem(self, base: Key, setting: str, name: str, message: str) -> None:
        """A check of one [bridges.NAME] or [maps.NAME] table, at the line of the key it is
        about: of the keys it names that the table sets, the one whose value alone fails
        it, else the first. Left out when it names a key of the wrong type."""
        entry = self._entries[setting][name]
        rest = message[len(f"{setting}.{name}") :]
        named = sorted(
            (key for key in _NAMED_FIELDS[setting] if _names_key(rest, key)),
            key=lambda key: _names_key(rest, key),
        )
        if any((setting, name, key) in self._broken for key in named):
            return
        in_file = [key for key in named if key in entry]
        if len(in_file) > 1:
            in_file.sort(key=lambda key: not self._fails_alone(setting, name, key, message))
        self.at((*base, setting, name, *in_file[:1]), message)

    def _fails_alone(self, setting: str, name: str, key: str, message: str) -> bool:
        """Whether the table's ``key``, with its other keys at their defaults, fails the
        check that said ``message``."""
        fields = _NAMED_FIELDS[setting]
        entry = self._entries[setting][name]
        alone = {k: v for k, v in entry.items() if k == key or fields[k].required}
        values: dict[str, Any] = {
            "bridges": {n: {"url": "", **b} for n, b in self._entries.get("bridges", {}).items()}
        }
        values[setting] = {name: {"url": "", **alone} if setting == "bridges" else alone}
        try:
            msgspec.convert(values, ServiceConfig, strict=False)
        except msgspec.ValidationError as exc:
            cause = exc.__cause__
            return isinstance(cause, SettingProblems) and message in cause.problems
        return False


def _label(principal: dict[str, Any], index: int) -> str:
    name = principal.get("name")
    return f"principal {name!r}" if isinstance(name, str) else f"principal #{index + 1}"


def _names(message: str, key: str) -> int:
    """Where ``message`` names the setting ``key`` as a word (its offset + 1), or 0."""
    found = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)
    return found.start() + 1 if found else 0


def _port_parses(url: str) -> bool:
    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    return port is None or port >= 0


def _names_key(text: str, key: str) -> int:
    """Where ``text`` names the table key ``key`` as a word, also after a dot (``maps.m.bridge``)
    (its offset + 1), or 0."""
    found = re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text)
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
    """One line: where it listens, who may connect, TLS, the data directory, and the
    database bridges with their maps."""
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
    text = (
        f"listeners: {', '.join(listeners)}; principals: {who}; TLS: {tls}; "
        f"data_dir: {config.data_dir}"
    )
    if config.bridges:  # their schemes and maps, not their URLs (passwords)
        bridges = []
        for name, bridge in config.bridges.items():
            maps = [m for m, spec in config.maps.items() if spec.bridge == name]
            scheme = bridge.url.partition("://")[0]
            bridges.append(f"{name} ({scheme}: {', '.join(maps) or 'no maps'})")
        every = f"every {config.flush_interval:g} s" if config.flush_interval else "on request"
        text += f"; bridges: {', '.join(bridges)}; flush: {every} and on close"
    return text
