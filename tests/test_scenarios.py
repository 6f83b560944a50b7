"""Scenario files: the catalogue loads, and every mistake names its field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import ConfigError
from lab.faults import scenario
from lab.faults.scenario import FAULT_KINDS, Outcome, Step

CATALOGUE = Path(__file__).resolve().parent.parent / "scenarios"

MINIMAL = """
description = "a block arrives corrupted"
[fault]
kind = "corrupt-block"
[expect]
outcomes = ["keeps-old-binary"]
"""


def write(tmp_path: Path, text: str, name: str = "case.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_catalogue_has_at_least_twenty_scenarios_that_load():
    scenarios = scenario.load_many([CATALOGUE])
    assert len(scenarios) >= 20
    kinds = {item.fault.kind for item in scenarios}
    # Every side of fault injection is represented.
    assert {FAULT_KINDS[kind].side for kind in kinds} == {"proxy", "server", "target"}
    assert {"native", "recovery"} <= {item.mode for item in scenarios}


def test_catalogue_covers_both_update_directions_between_releases():
    pairs = {(str(item.from_version), str(item.to_version)) for item in scenario.load_many([CATALOGUE])}
    assert ("0.7.99", "1.1.55") in pairs
    assert ("1.1.55", "0.7.99") in pairs


def test_defaults(tmp_path):
    loaded = scenario.load(write(tmp_path, MINIMAL))
    assert loaded.target == "debian12-systemd"
    assert loaded.mode == "native"
    assert str(loaded.from_version) == "1.1.55"
    assert str(loaded.to_version) == "1.1.55+1"
    assert loaded.cycles == 1
    assert loaded.outcomes == (Outcome.KEEPS_OLD_BINARY,)
    assert loaded.known_failure is None


def test_default_step_follows_the_mode(tmp_path):
    text = MINIMAL.replace('"corrupt-block"', '"kill-agent"')
    assert scenario.load(write(tmp_path, text)).fault.step is Step.TRANSFER_HALF
    recovery = scenario.load(write(tmp_path, 'mode = "recovery"\n' + text))
    assert recovery.fault.step is Step.DOWNLOAD_HALF


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('kind = "corrupt-block"', 'kind = "meteor"'), "kind 'meteor' is unknown; allowed values: "),
        (('outcomes = ["keeps-old-binary"]', 'outcomes = ["happy"]'), "outcomes has 'happy'; allowed values: updated, keeps-old-binary"),
        (('description', 'mode = "sideways"\ndescription'), "mode is 'sideways'; allowed values: native, recovery"),
        (('description', 'target = "debian99"\ndescription'), "target 'debian99' is unknown; allowed values: "),
        (('description', 'cycles = 0\ndescription'), "cycles is 0; allowed values are 1 to 5"),
        (('description', 'watchdog = 5000\ndescription'), "watchdog is 5000 seconds; allowed values are 10 to 900"),
        (('description', 'colour = "red"\ndescription'), "unknown field colour; allowed fields: "),
        (('description', 'from = "latest"\ndescription'), "from: 'latest' is not an agent version"),
        (('kind = "corrupt-block"', 'kind = "corrupt-block"\nblock = "three"'), "block must be an integer, not 'three'"),
        (('kind = "corrupt-block"', 'kind = "corrupt-block"\nat = "transfer-half"'), "kind 'corrupt-block' has no trigger step; remove `at`"),
        (('kind = "corrupt-block"', 'kind = "kill-agent"\nat = "downloaded"'), "at is 'downloaded'; allowed values for kill-agent in native mode: before-cycle, transfer-start"),
        (('kind = "corrupt-block"', 'kind = "proxy-reset"'), "proxy-reset needs bytes (int)"),
        (('kind = "corrupt-block"', 'kind = "http-error"\nstatus = 500'), "kind 'http-error' applies to mode recovery, not native"),
        (('kind = "corrupt-block"', 'kind = "remove-init-script"'), "needs a target with sysvinit or openrc, and debian12-systemd runs systemd"),
        (('outcomes = ["keeps-old-binary"]', 'outcomes = ["updated", "keeps-old-binary"]'), "both updated and keeps-old-binary"),
        (('outcomes = ["keeps-old-binary"]', "outcomes = []"), "outcomes is empty; allowed values: "),
        (('description', 'from = "1.1.55"\nto = "1.1.55"\ndescription'), "from and to are both 1.1.55"),
        (('description = "a block arrives corrupted"', ""), "the field description is missing"),
        (('description = "a block arrives corrupted"', 'description = " "'), "description is empty"),
        (('outcomes = ["keeps-old-binary"]', 'outcomes = ["offline", "keeps-old-binary"]'), "both offline and keeps-old-binary"),
        (('outcomes = ["keeps-old-binary"]', 'outcomes = ["hangs", "next-cycle-succeeds"]'), "both hangs and next-cycle-succeeds"),
        (('outcomes = ["keeps-old-binary"]', 'outcomes = ["updated", "updated"]'), "lists 'updated' twice"),
        (('description', 'from = "1.1.55+8000000000"\ndescription'), "appends 8000000000 bytes; allowed values are 0 to 1024"),
        (('kind = "corrupt-block"', 'kind = "proxy-stall"\nbytes = 10\nseconds = nan'), "seconds is nan; it must be a finite number"),
        (('kind = "corrupt-block"', 'kind = "proxy-slow"\nlatency_ms = inf'), "latency_ms is inf; it must be a finite number"),
        (('description', 'watchdog = nan\ndescription'), "watchdog is nan seconds"),
    ],
)
def test_bad_field_is_named_with_allowed_values(tmp_path, change, message):
    old, new = change
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        scenario.load(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_recovery_only_fault_in_recovery_mode_is_accepted(tmp_path):
    text = 'mode = "recovery"\n' + MINIMAL.replace('kind = "corrupt-block"', 'kind = "http-error"\nstatus = 503')
    assert scenario.load(write(tmp_path, text)).fault.parameters == {"status": 503}


def test_http_status_out_of_range(tmp_path):
    text = 'mode = "recovery"\n' + MINIMAL.replace('kind = "corrupt-block"', 'kind = "http-error"\nstatus = 200')
    with pytest.raises(ConfigError, match="status is 200; allowed values are 400 to 599"):
        scenario.load(write(tmp_path, text))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        scenario.load(write(tmp_path, "description = \n"))
    with pytest.raises(ConfigError, match="not found"):
        scenario.load(tmp_path / "absent.toml")


def test_folder_without_scenarios(tmp_path):
    with pytest.raises(ConfigError, match="contains no scenario files"):
        scenario.load_many([tmp_path])


def test_two_scenarios_with_one_name(tmp_path):
    first = write(tmp_path, MINIMAL, "same.toml")
    other = tmp_path / "other"
    other.mkdir()
    second = write(other, MINIMAL, "same.toml")
    with pytest.raises(ConfigError, match="two scenarios are named same"):
        scenario.load_many([first, second])


def test_known_failure_needs_evidence(tmp_path):
    with pytest.raises(ConfigError, match=r"\[known_failure\]: the field evidence is missing"):
        scenario.load(write(tmp_path, MINIMAL + "[known_failure]\n"))
    with pytest.raises(ConfigError, match=r"\[known_failure\] evidence is empty"):
        scenario.load(write(tmp_path, MINIMAL + '[known_failure]\nevidence = "  "\n'))
    # A known failure documents what the agent does; it cannot make a miss pass.
    with pytest.raises(ConfigError, match="unknown field intermittent"):
        scenario.load(write(tmp_path, MINIMAL + '[known_failure]\nevidence = "log"\nintermittent = true\n'))
    loaded = scenario.load(write(tmp_path, MINIMAL + '[known_failure]\nevidence = "meshagent.log shows it"\n'))
    assert loaded.known_failure is not None and loaded.known_failure.evidence == "meshagent.log shows it"


def test_symlink_and_target_load_once(tmp_path):
    target = write(tmp_path, MINIMAL, "target.toml")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert len(scenario.load_many([target, link])) == 1


def test_fifo_is_not_read(tmp_path):
    import os

    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        scenario.load(fifo)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert scenario.load(path).fault.kind == "corrupt-block"
