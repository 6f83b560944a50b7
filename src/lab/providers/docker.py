"""Docker provider (work in progress)."""
from __future__ import annotations
import docker
import docker.errors
from lab.errors import PrerequisiteError

def connect() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as error:
        raise PrerequisiteError(f"cannot reach Docker: {error}; run scripts/ensure-docker.sh") from error
    return client
