"""Log tests of the adapters for the VM targets' service managers: launchd, FreeBSD rc.d,
Windows SCM and Upstart, replayed from the recordings in tests/data/services."""

from __future__ import annotations

import pytest

from lab.errors import CommandError
from lab.services import FreeBSD, Launchd, Upstart, WindowsScm
from test_services import replay


def test_freebsd_logs_tail_messages():
    text = FreeBSD(replay("freebsd", "logs.txt")).logs("meshagent", lines=20)
    assert "daemon[1021]: process 1022 exited" in text
    assert len(text.splitlines()) == 3


def test_launchd_logs_filter_agent_process():
    target = replay("launchd", "logs.txt")
    text = Launchd(target).logs("meshagent", lines=20)
    assert target.commands[-1].startswith("log show --style syslog --last 1d --predicate 'process == \"meshagent\"'")
    assert "meshagent[530]" in text


def test_upstart_logs_job_log():
    text = Upstart(replay("upstart", "logs.txt")).logs("meshagent", lines=20)
    assert text.splitlines() == ["Connecting to: wss://127.0.0.1:443/agent.ashx", "Connected."]


def test_upstart_logs_missing_file_raises():
    with pytest.raises(CommandError) as raised:
        Upstart(replay("upstart", "logs-missing.txt")).logs("meshagent", lines=20)
    assert raised.value.exit_status == 1


def test_windows_logs_scm_events():
    text = WindowsScm(replay("windows", "logs.txt")).logs("Mesh Agent", lines=20)
    assert "entered the running state" in text
    assert text.count("Id          : 7036") == 2
