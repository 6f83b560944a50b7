"""Shared fixtures.

Tests that run the real MeshAgent carry the `agent` marker, which pyproject.toml declares, so
``pytest -m "not agent"`` leaves them out.
"""

from __future__ import annotations

import pytest

from lab import agents
from lab.errors import AgentPackageError, PrerequisiteError


@pytest.fixture(scope="session")
def agent_packages() -> dict[str, agents.AgentPackage]:
    """Return the meshcentral packages of `agents.KNOWN_VERSIONS` by version, fetching any missing one.

    A fetch runs ``npm pack`` once and caches the agents under $XDG_CACHE_HOME/updatelab. The
    tests that use this fixture are skipped when npm is missing or the fetch fails.
    """
    packages = {}
    for version in agents.KNOWN_VERSIONS:
        try:
            packages[version] = agents.fetch_package(version)
        except PrerequisiteError as error:
            pytest.skip(f"cannot fetch meshcentral {version} agents: {error}")
        except AgentPackageError as error:
            pytest.skip(f"fetching meshcentral {version} agents failed: {error}")
    return packages
