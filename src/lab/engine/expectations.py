"""Expected outcomes of the Linux matrix, read from a TOML file in the repository.

Every target and mode is expected to pass unless the file records a known agent failure for it:

    [[known_failure]]
    target = "debian12-runit"
    mode = "native"
    reason = "no connection"     # text that the failed cycle's reason must contain
    evidence = "why this is the agent's behaviour, and which evidence file shows it"
    intermittent = true          # optional: the agent races, so a pass also matches

A matrix matches its expectations when every entry passed or failed exactly as recorded. An
unexpected pass is a mismatch too, so a fixed agent or a lab change shows up.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from lab.engine.report import Report
from lab.errors import ConfigError

_FIELDS = {"target", "mode", "reason", "evidence"}
_OPTIONAL_FIELDS = {"intermittent"}


@dataclasses.dataclass(frozen=True)
class KnownFailure:
    target: str
    mode: str
    reason: str
    evidence: str
    intermittent: bool = False


@dataclasses.dataclass(frozen=True)
class Expectations:
    failures: dict[str, KnownFailure]

    @classmethod
    def load(cls, path: Path) -> Expectations:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"expectations file {path} not found") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"expectations file {path} is not valid TOML: {error}") from None
        failures = {}
        for index, entry in enumerate(data.get("known_failure", [])):
            missing = _FIELDS - set(entry)
            unknown = set(entry) - _FIELDS - _OPTIONAL_FIELDS
            if missing or unknown:
                raise ConfigError(
                    f"{path}: known_failure #{index + 1} "
                    + (f"is missing {', '.join(sorted(missing))}" if missing else f"has unknown fields {', '.join(sorted(unknown))}")
                    + f"; allowed fields are {', '.join(sorted(_FIELDS | _OPTIONAL_FIELDS))}"
                )
            if entry["mode"] not in ("native", "recovery"):
                raise ConfigError(f"{path}: known_failure #{index + 1} has mode {entry['mode']!r}; use native or recovery")
            intermittent = entry.get("intermittent", False)
            if not isinstance(intermittent, bool):
                raise ConfigError(f"{path}: known_failure #{index + 1} has intermittent = {intermittent!r}; use true or false")
            failure = KnownFailure(**{key: str(entry[key]) for key in _FIELDS}, intermittent=intermittent)
            failures[f"{failure.target}/{failure.mode}"] = failure
        return cls(failures)


def judge_matrix(report: Report, expectations: Expectations, labels: list[str]) -> dict[str, Any]:
    """Compare each target/mode entry with its expectation; return lines and an overall flag."""
    lines = []
    ok = True
    for label in labels:
        cycles = [cycle for cycle in report.cycles if cycle.target == label]
        failures = [cycle for cycle in cycles if not cycle.passed]
        known = expectations.failures.get(label)
        if not cycles:
            matched, text = False, "no cycle ran"
        elif known is None:
            matched = not failures
            text = "passed as expected" if matched else f"unexpected failure: {failures[0].reason}"
        elif not failures and known.intermittent:
            matched, text = True, f"passed; the intermittent known failure ({known.reason}) did not occur this time"
        elif not failures:
            matched, text = False, f"unexpected pass: recorded as a known failure ({known.reason})"
        else:
            matched = known.reason in failures[0].reason
            text = (
                f"known agent failure observed: {failures[0].reason}"
                if matched
                else f"failed differently: expected {known.reason!r}, got {failures[0].reason!r}"
            )
        ok = ok and matched
        lines.append(f"{'[green]match[/green]' if matched else '[red]MISMATCH[/red]'} {label}: {text}")
    return {"ok": ok, "lines": lines}
