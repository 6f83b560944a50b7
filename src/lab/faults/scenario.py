"""Fault scenarios: TOML files that inject one fault at one step of an update cycle.

A scenario file looks like this (every field but `description`, `[fault] kind` and
`[expect] outcomes` has a default)::

    description = "A block arrives corrupted; the agent must reject the update."
    target = "debian12-systemd"
    from = "1.1.55"          # the agent installed first
    to = "1.1.55+1"          # the agent the update installs; "+N" appends N bytes
    mode = "native"          # native or recovery
    cycles = 1               # faulted cycles before the clean one
    watchdog = 120           # seconds before the lab declares the agent hung
    slow = false             # true keeps it out of the quick subset

    [fault]
    kind = "corrupt-block"
    block = 3

    [expect]
    outcomes = ["keeps-old-binary", "next-cycle-succeeds", "no-update-file", "service-running"]

    [known_failure]          # optional: the outcomes describe an agent bug
    evidence = "what the evidence shows"

Every error names the file, the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from lab import images
from lab.errors import ConfigError


class Step(enum.StrEnum):
    """Points of a cycle at which a fault fires."""

    DEPLOYED = "deployed"  # after the installer ran, before the agent's first connection is used
    BEFORE_CYCLE = "before-cycle"  # connected, hash known, update not yet sent
    TRANSFER_START = "transfer-start"
    TRANSFER_HALF = "transfer-half"  # half the native update acknowledged
    TRANSFER_DONE = "transfer-done"  # every block acknowledged, the final hash not yet sent
    HASH_SENT = "hash-sent"  # the final hash went out; the agent verifies and swaps
    AGENTUPDATE_SENT = "agentupdate-sent"
    DOWNLOAD_HALF = "download-half"  # half the recovery download sent
    DOWNLOAD_DONE = "download-done"  # all but the last chunk of the download sent
    DOWNLOADED = "downloaded"  # the core reported a verified download and goes on to swap


class Outcome(enum.StrEnum):
    UPDATED = "updated"
    KEEPS_OLD_BINARY = "keeps-old-binary"
    WRITE_ERROR = "write-error"
    NEXT_CYCLE_SUCCEEDS = "next-cycle-succeeds"
    NO_UPDATE_FILE = "no-update-file"
    SERVICE_RUNNING = "service-running"
    OFFLINE = "offline"
    HANGS = "hangs"


@dataclasses.dataclass(frozen=True)
class FaultKind:
    """The configuration of a fault kind: its side, parameters, default step and allowed modes."""

    side: str  # proxy, server or target
    parameters: dict[str, type]
    default_step: Step | None = None
    steps: tuple[Step, ...] = ()
    modes: tuple[str, ...] = ("native", "recovery")
    required: tuple[str, ...] = ()
    #: Service managers the fault works with; empty means every one.
    managers: tuple[str, ...] = ()


_NATIVE_STEPS = (Step.TRANSFER_START, Step.TRANSFER_HALF, Step.TRANSFER_DONE, Step.HASH_SENT)
_RECOVERY_STEPS = (Step.AGENTUPDATE_SENT, Step.DOWNLOAD_HALF, Step.DOWNLOAD_DONE, Step.DOWNLOADED)
_ALL_CYCLE_STEPS = (Step.BEFORE_CYCLE, *_NATIVE_STEPS, *_RECOVERY_STEPS)

FAULT_KINDS: dict[str, FaultKind] = {
    "none": FaultKind("server", {}),
    # Network, through the proxy.
    "proxy-reset": FaultKind("proxy", {"bytes": int}, required=("bytes",)),
    "proxy-stall": FaultKind("proxy", {"bytes": int, "seconds": float}, required=("bytes", "seconds")),
    "proxy-slow": FaultKind("proxy", {"latency_ms": float, "bytes_per_second": float}),
    "proxy-drop": FaultKind("proxy", {}, Step.TRANSFER_HALF, _ALL_CYCLE_STEPS),
    # The lab server.
    "corrupt-block": FaultKind("server", {"block": int}, modes=("native",)),
    "wrong-final-hash": FaultKind("server", {}),
    "truncated-binary": FaultKind("server", {"share": float}),
    "server-restart": FaultKind("server", {"seconds": float}, Step.TRANSFER_HALF, _ALL_CYCLE_STEPS),
    "other-certificate": FaultKind("server", {}, modes=("recovery",)),
    "altered-download": FaultKind("server", {}, modes=("recovery",)),
    "http-error": FaultKind("server", {"status": int}, modes=("recovery",), required=("status",)),
    "slow-download": FaultKind("server", {"bytes_per_second": float}, modes=("recovery",), required=("bytes_per_second",)),
    # Inside the target.
    "disk-full": FaultKind("target", {"free_kb": int}, Step.TRANSFER_START, _ALL_CYCLE_STEPS),
    "read-only-install-dir": FaultKind("target", {}, Step.TRANSFER_DONE, _ALL_CYCLE_STEPS),
    "noexec-tmp": FaultKind("target", {}),
    "immutable-binary": FaultKind("target", {}, Step.BEFORE_CYCLE, _ALL_CYCLE_STEPS),
    "kill-agent": FaultKind("target", {}, Step.TRANSFER_HALF, _ALL_CYCLE_STEPS),
    "mask-service": FaultKind("target", {}, Step.BEFORE_CYCLE, _ALL_CYCLE_STEPS, managers=("systemd",)),
    "remove-init-script": FaultKind("target", {}, Step.BEFORE_CYCLE, _ALL_CYCLE_STEPS, managers=("sysvinit", "openrc")),
    "append-byte": FaultKind("target", {}, Step.DEPLOYED, (Step.DEPLOYED,)),
}

_TOP_FIELDS = {
    "description", "target", "from", "to", "mode", "cycles", "watchdog", "settle", "slow", "compress", "fault", "expect",
    "known_failure",
}
_VERSION = re.compile(r"^(?P<version>\d+\.\d+\.\d+)(?:\+(?P<extra>\d+))?$")
#: Most bytes a version may append; one is enough to make a distinct binary.
MAX_APPENDED = 1024


@dataclasses.dataclass(frozen=True)
class AgentVersion:
    """An agent from the npm package, optionally with bytes appended to make a distinct binary."""

    version: str
    appended: int = 0

    @classmethod
    def parse(cls, text: str, where: str) -> AgentVersion:
        match = _VERSION.match(text)
        if match is None:
            raise ConfigError(f"{where}: {text!r} is not an agent version; write it like \"1.1.55\" or \"1.1.55+1\"")
        appended = int(match["extra"] or 0)
        if appended > MAX_APPENDED:
            raise ConfigError(f"{where}: {text!r} appends {appended} bytes; allowed values are 0 to {MAX_APPENDED}")
        return cls(match["version"], appended)

    def __str__(self) -> str:
        return self.version + (f"+{self.appended}" if self.appended else "")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    step: Step | None
    parameters: dict[str, Any]

    @property
    def side(self) -> str:
        return FAULT_KINDS[self.kind].side

    def describe(self) -> str:
        parameters = ", ".join(f"{name}={value}" for name, value in self.parameters.items())
        text = self.kind + (f" ({parameters})" if parameters else "")
        return text + (f" at {self.step}" if self.step else "")


@dataclasses.dataclass(frozen=True)
class KnownFailure:
    evidence: str


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    description: str
    target: str
    from_version: AgentVersion
    to_version: AgentVersion
    mode: str
    cycles: int
    watchdog: float
    settle: float
    slow: bool
    #: Zip native updates when the agent advertises compression, as MeshCentral does.
    compress: bool
    fault: Fault
    outcomes: tuple[Outcome, ...]
    known_failure: KnownFailure | None


def load(path: Path) -> Scenario:
    """Read and check one scenario file; raise ConfigError naming the field at fault."""
    where = str(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file; give scenario files (*.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"scenario file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give scenario files, e.g. {path}/*.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where} is not valid TOML: {error}") from None

    _no_unknown(data, _TOP_FIELDS, where)
    description = _field(data, "description", str, where)
    if not description.strip():
        raise ConfigError(f"{where}: description is empty; say what the fault is and what the agent must do")
    target = _field(data, "target", str, where, "debian12-systemd")
    known = images.known_targets()
    if target not in known:
        raise ConfigError(f"{where}: target {target!r} is unknown; allowed values: {', '.join(known)}")
    mode = _choice(data, "mode", ("native", "recovery"), where, "native")
    from_version = AgentVersion.parse(_field(data, "from", str, where, "1.1.55"), f"{where}: from")
    default_to = f"{from_version.version}+{from_version.appended + 1}"
    to_version = AgentVersion.parse(_field(data, "to", str, where, default_to), f"{where}: to")
    cycles = _field(data, "cycles", int, where, 1)
    if not 1 <= cycles <= 5:
        raise ConfigError(f"{where}: cycles is {cycles}; allowed values are 1 to 5")
    watchdog = float(_field(data, "watchdog", (int, float), where, 120))
    if not 10 <= watchdog <= 900:
        raise ConfigError(f"{where}: watchdog is {watchdog:g} seconds; allowed values are 10 to 900")
    settle = float(_field(data, "settle", (int, float), where, 45))
    if not 5 <= settle <= 600:
        raise ConfigError(f"{where}: settle is {settle:g} seconds; allowed values are 5 to 600")
    if settle >= watchdog:
        raise ConfigError(f"{where}: settle ({settle:g} s) must be shorter than watchdog ({watchdog:g} s)")
    slow = _field(data, "slow", bool, where, False)
    compress = _field(data, "compress", bool, where, True)

    fault = _load_fault(_field(data, "fault", dict, where), mode, f"{where}: [fault]")
    managers = FAULT_KINDS[fault.kind].managers
    manager = images.load_recipe(target).service_manager
    if managers and manager not in managers:
        raise ConfigError(
            f"{where}: [fault] kind {fault.kind!r} needs a target with {' or '.join(managers)}, "
            f"and {target} runs {manager}"
        )
    if from_version == to_version and fault.kind != "append-byte":
        raise ConfigError(
            f"{where}: from and to are both {from_version}, so an update could not be distinguished from none; "
            f"make them differ, e.g. to = \"{from_version.version}+{from_version.appended + 1}\""
        )
    expect = _field(data, "expect", dict, where)
    _no_unknown(expect, {"outcomes"}, f"{where}: [expect]")
    names = _field(expect, "outcomes", list, f"{where}: [expect]")
    allowed = [outcome.value for outcome in Outcome]
    if not names:
        raise ConfigError(f"{where}: [expect] outcomes is empty; allowed values: {', '.join(allowed)}")
    outcomes: list[Outcome] = []
    for name in names:
        if name not in allowed:
            raise ConfigError(f"{where}: [expect] outcomes has {name!r}; allowed values: {', '.join(allowed)}")
        if name in outcomes:
            raise ConfigError(f"{where}: [expect] outcomes lists {name!r} twice")
        outcomes.append(Outcome(name))
    # The agent ends a scenario in one place: on the new binary, on the old one, offline, or hung.
    end_states = [Outcome.UPDATED, Outcome.KEEPS_OLD_BINARY, Outcome.OFFLINE, Outcome.HANGS]
    expected_ends = [outcome for outcome in outcomes if outcome in end_states]
    if len(expected_ends) > 1:
        raise ConfigError(
            f"{where}: [expect] outcomes has both {expected_ends[0]} and {expected_ends[1]}, which exclude each other"
        )
    for pair in ({Outcome.OFFLINE, Outcome.SERVICE_RUNNING}, {Outcome.HANGS, Outcome.NEXT_CYCLE_SUCCEEDS}):
        if pair <= set(outcomes):
            first, second = sorted(pair)
            raise ConfigError(f"{where}: [expect] outcomes has both {first} and {second}, which exclude each other")

    known_failure = None
    if "known_failure" in data:
        table = _field(data, "known_failure", dict, where)
        _no_unknown(table, {"evidence"}, f"{where}: [known_failure]")
        evidence = _field(table, "evidence", str, f"{where}: [known_failure]")
        if not evidence.strip():
            raise ConfigError(f"{where}: [known_failure] evidence is empty; name the evidence file and what it shows")
        known_failure = KnownFailure(evidence.strip())
    return Scenario(
        name=path.stem,
        path=path,
        description=description.strip(),
        target=target,
        from_version=from_version,
        to_version=to_version,
        mode=mode,
        cycles=cycles,
        watchdog=watchdog,
        settle=settle,
        slow=slow,
        compress=compress,
        fault=fault,
        outcomes=tuple(outcomes),
        known_failure=known_failure,
    )


def load_many(paths: list[Path]) -> list[Scenario]:
    """Load every file, and every *.toml file in each folder given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.toml"))
            if not found:
                raise ConfigError(f"{path} contains no scenario files (*.toml)")
            files += found
        else:
            files.append(path)
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    scenarios = [load(path) for path in unique.values()]
    seen: dict[str, Path] = {}
    for scenario in scenarios:
        if scenario.name in seen:
            raise ConfigError(f"two scenarios are named {scenario.name}: {seen[scenario.name]} and {scenario.path}")
        seen[scenario.name] = scenario.path
    return scenarios


def _load_fault(table: dict[str, Any], mode: str, where: str) -> Fault:
    kinds = sorted(FAULT_KINDS)
    kind = _field(table, "kind", str, where)
    if kind not in FAULT_KINDS:
        raise ConfigError(f"{where}: kind {kind!r} is unknown; allowed values: {', '.join(kinds)}")
    spec = FAULT_KINDS[kind]
    if mode not in spec.modes:
        raise ConfigError(f"{where}: kind {kind!r} applies to mode {' or '.join(spec.modes)}, not {mode}")
    _no_unknown(table, {"kind", "at", *spec.parameters}, where)
    step = spec.default_step
    if "at" in table:
        if not spec.steps:
            raise ConfigError(f"{where}: kind {kind!r} has no trigger step; remove `at`")
        allowed = [s.value for s in spec.steps if _step_fits(s, mode)]
        value = table["at"]
        if value not in allowed:
            raise ConfigError(f"{where}: at is {value!r}; allowed values for {kind} in {mode} mode: {', '.join(allowed)}")
        step = Step(value)
    elif step is not None and not _step_fits(step, mode):
        fallback = {Step.TRANSFER_HALF: Step.DOWNLOAD_HALF, Step.TRANSFER_START: Step.AGENTUPDATE_SENT,
                    Step.TRANSFER_DONE: Step.DOWNLOAD_DONE, Step.HASH_SENT: Step.DOWNLOADED}
        step = fallback.get(step, step)
    parameters: dict[str, Any] = {}
    for name, kind_type in spec.parameters.items():
        if name not in table:
            if name in spec.required:
                raise ConfigError(f"{where}: {kind} needs {name} ({kind_type.__name__})")
            continue
        value = table[name]
        if kind_type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind_type) or isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be {'a number' if kind_type is float else 'an integer'}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {name} is {value}; it must be a finite number")
        if value < 0:
            raise ConfigError(f"{where}: {name} is {value}; it must not be negative")
        parameters[name] = value
    if kind == "truncated-binary" and not 0 < parameters.get("share", 0.5) < 1:
        raise ConfigError(f"{where}: share is {parameters['share']}; allowed values are between 0 and 1")
    if kind == "http-error" and not 400 <= parameters["status"] <= 599:
        raise ConfigError(f"{where}: status is {parameters['status']}; allowed values are 400 to 599")
    return Fault(kind, step, parameters)


def _step_fits(step: Step, mode: str) -> bool:
    if step in _NATIVE_STEPS:
        return mode == "native"
    if step in _RECOVERY_STEPS:
        return mode == "recovery"
    return True


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field {', '.join(unknown)}; allowed fields: {', '.join(sorted(allowed))}")


_MISSING = object()


def _field(table: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING) -> Any:
    if name not in table:
        if default is _MISSING:
            raise ConfigError(f"{where}: the field {name} is missing")
        return default
    value = table[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table", list: "a list"}
        raise ConfigError(f"{where}: {name} must be {' or '.join(names[k] for k in kinds)}, not {value!r}")
    return value


def _choice(table: dict[str, Any], name: str, allowed: tuple[str, ...], where: str, default: str) -> str:
    value = _field(table, name, str, where, default)
    if value not in allowed:
        raise ConfigError(f"{where}: {name} is {value!r}; allowed values: {', '.join(allowed)}")
    return value
