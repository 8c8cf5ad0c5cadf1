"""The client side of Ray jobs: ``lctrain submit`` and ``lctrain jobs status|logs|stop``.

Authentication. Clusters run with Ray token authentication (``RAY_AUTH_MODE=token`` on every node: the job server
answers 401 to requests without the token). lctrain sends the token as ``Authorization: Bearer <token>`` and takes it,
in this order, from ``--token-file FILE``, the ``RAY_AUTH_TOKEN`` environment variable, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (Ray's own places; ``ray get-auth-token`` on the head prints it).
Without a token it stops with an error; only ``RAY_AUTH_MODE=disabled`` (Ray's explicit opt-out) talks to a cluster
without authentication.

What a job carries. The config is loaded and checked here first (a bad config ends the command with one line and
exit status 2; nothing is submitted). Relative paths in it (run directory, tokenizer, dataset) are made absolute
against ``--storage`` (default: the current directory), the shared storage every node sees. The job's working_dir is
lctrain's code laid out as the installed package (``lctrain/`` with ``kernels/`` and ``parallel/`` mapped in as
``setup.py`` maps them) plus the resolved config as ``run_config.yaml``; nothing else of the project (no .venv, runs,
.git, .whl) is uploaded. The nodes need lctrain's dependencies installed (torch, deepspeed, megatron-core, ray).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time

from lctrain.config import ConfigError, RunConfig, check_config, dump_config
from lctrain.ray.trainer import Scaling, absolute_paths

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """The cluster could not be reached, refused the token, or does not know the job: one line for the user."""


def read_token(token_file: str | None) -> str | None:
    """The cluster's auth token (see the module docstring for where it is looked for); None only when
    RAY_AUTH_MODE=disabled asks for no authentication."""
    if token_file:
        path = pathlib.Path(token_file).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise ConfigError(f"--token-file {token_file!r} is not a file holding a Ray auth token")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    for path in ([pathlib.Path(named).expanduser()] if named else []) + [pathlib.Path.home() / ".ray" / "auth_token"]:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    raise ConfigError("no Ray auth token: pass --token-file FILE, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or "
                      "put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")


def connect(address: str | None, token_file: str | None):
    """A JobSubmissionClient for the cluster's job server (http://HEAD:8265), sending the auth token."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith(("http://", "https://")):
        raise ConfigError(f"the cluster address must be the job server's URL, e.g. --address http://HEAD:8265 "
                          f"(or RAY_API_SERVER_ADDRESS); got {address!r}")
    token = read_token(token_file)
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address argument; here the resolved one wins.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        with _cluster_errors(address):
            return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _cluster_errors(address: str):
    import requests

    try:
        yield
    except requests.exceptions.RequestException as e:
        raise ClusterError(f"cannot reach the Ray job server at {address}: {type(e).__name__}") from None
    except RuntimeError as e:  # the SDK's errors: authentication (401/403), unknown job, server errors
        raise ClusterError(" ".join(str(e).split())) from None


def stage_working_dir(config: RunConfig, into: pathlib.Path) -> pathlib.Path:
    """Fill ``into`` with what the job needs: the lctrain package (kernels/ and parallel/ at their installed places)
    and the resolved config as run_config.yaml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = pathlib.Path(importlib.util.find_spec("lctrain").origin).parent
    shutil.copytree(package, into / "lctrain", ignore=ignore)
    for sub in ("kernels", "parallel"):
        source = pathlib.Path(importlib.util.find_spec(f"lctrain.{sub}").origin).parent
        if not (into / "lctrain" / sub).is_dir():  # the source tree keeps them beside lctrain/ (see setup.py)
            shutil.copytree(source, into / "lctrain" / sub, ignore=ignore)
    (into / "run_config.yaml").write_text(dump_config(config))
    return into


def submit(client, config: RunConfig, scaling: Scaling, storage: pathlib.Path, env: dict[str, str],
           job_id: str | None = None) -> str:
    """Check the config for this many workers, then submit it; returns the job id."""
    check_config(config, scaling.num_workers)
    config = absolute_paths(config, storage)
    entrypoint = shlex.join(["python", "-m", "lctrain.ray.entrypoint", "--config", "run_config.yaml", *scaling.args()])
    with tempfile.TemporaryDirectory(prefix="lctrain-job-") as tmp:
        runtime_env = {"working_dir": str(stage_working_dir(config, pathlib.Path(tmp))),
                       "env_vars": {"PYTHONUNBUFFERED": "1", **env}}
        with _cluster_errors(client.get_address()):
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                     metadata={"lctrain_run_dir": config.run_dir})


def status(client, job_id: str):
    """(status name, message) of a job."""
    with _cluster_errors(client.get_address()):
        info = client.get_job_info(job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""


def follow(client, job_id: str, timeout: float | None) -> str:
    """Print the job's logs as they come until it ends; returns its final status. Past ``timeout`` seconds the job is
    stopped and 'TIMEOUT' returned."""

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    deadline = time.monotonic() + timeout if timeout else None
    try:
        with _cluster_errors(client.get_address()):
            asyncio.run(asyncio.wait_for(tail(), timeout))
    except (asyncio.TimeoutError, TimeoutError):
        stop(client, job_id)
        return "TIMEOUT"
    # The log stream closes when the driver exits; the status follows within moments.
    return wait_for_end(client, job_id, max(5.0, deadline - time.monotonic()) if deadline else 60.0)


def wait_for_end(client, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state, _ = status(client, job_id)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def stop(client, job_id: str, timeout: float = 30.0) -> str:
    """Stop a job and wait (bounded) until Ray reports it ended; returns its status."""
    with _cluster_errors(client.get_address()):
        client.stop_job(job_id)
    return wait_for_end(client, job_id, timeout)


def logs(client, job_id: str) -> str:
    with _cluster_errors(client.get_address()):
        return client.get_job_logs(job_id)
