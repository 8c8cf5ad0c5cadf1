"""A single-node Ray cluster on this machine, for the demo, the tests and the GPU check: token authentication, bound to
loopback, always stopped on exit (errors included).

    with LocalCluster(workdir, num_cpus=4) as cluster:
        cluster.run(["lctrain", "submit", "--address", cluster.address, "--token-file", str(cluster.token_file), ...])

``isolated_network=True`` (root only: Linux namespaces) runs the cluster and every ``cluster.run`` command inside a
private network and PID namespace whose only interface is loopback, so nothing of it can bind another interface
(Ray's processes otherwise listen on the machine's address); ending the namespace ends every process in it. Without
it the head is started with ``--node-ip-address 127.0.0.1`` and stopped with ``ray stop``, which stops every Ray
cluster of this user on the machine.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, also where no console script is installed
JOB_SERVER_PORT = 8265
GCS_PORT = 6379


def dashboard_available() -> bool:
    """Whether this Ray can run the job server (the dashboard's optional dependencies are installed)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def namespaces_available() -> bool:
    """Whether ``isolated_network`` can work here: root, with unshare, nsenter and ip."""
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip"))


class LocalCluster:
    def __init__(self, workdir: pathlib.Path, num_cpus: int | None = None, num_gpus: int | None = None,
                 dashboard: bool = True, isolated_network: bool = False, env: dict[str, str] | None = None,
                 start_timeout: float = 120.0):
        self.workdir = pathlib.Path(workdir).absolute()
        self.num_cpus, self.num_gpus, self.dashboard = num_cpus, num_gpus, dashboard
        self.isolated_network, self.start_timeout = isolated_network, start_timeout
        self.token_file = self.workdir / "auth_token"
        self.address = f"http://127.0.0.1:{JOB_SERVER_PORT}"  # the job server
        self.gcs_address = f"127.0.0.1:{GCS_PORT}"  # for ray.init / RAY_ADDRESS
        # Job entrypoints run `python`: this interpreter, through a folder that holds nothing else (putting the
        # environment's whole bin/ first would also swap tools such as ninja, whose two versions invalidate each
        # other's builds of DeepSpeed's ops).
        self.bin_dir = self.workdir / "bin"
        self.env = {**os.environ, **(env or {}), "PATH": str(self.bin_dir) + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self._holder: subprocess.Popen | None = None
        self._prefix: list[str] = []

    # -- commands that reach the cluster
    def run(self, cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: pathlib.Path | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` where the cluster is reachable (inside its namespace when isolated); its output is captured,
        or with ``capture=False`` goes to this process's stdout/stderr."""
        cwd = pathlib.Path(cwd or os.getcwd()).absolute()
        prefix = self._prefix + [f"--wd={cwd}", "--"] if self._prefix else []
        return subprocess.run(prefix + cmd, cwd=cwd, env={**self.env, **(env or {})}, capture_output=capture,
                              text=True, timeout=timeout)

    # -- lifetime
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        python = self.bin_dir / "python"  # a script, not a link: a venv is recognised by the path it is started as
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
        self.token_file.write_text(secrets.token_hex(32))  # Ray's own token format: 256 random bits
        self.token_file.chmod(0o600)
        try:
            if self.isolated_network:
                self._enter_namespace()
            cmd = RAY + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(GCS_PORT),
                         "--temp-dir", str(self.workdir / "ray"), "--disable-usage-stats",
                         "--include-dashboard", "true" if self.dashboard else "false"]
            if self.dashboard:
                cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(JOB_SERVER_PORT)]
            if self.num_cpus is not None:
                cmd += ["--num-cpus", str(self.num_cpus)]
            if self.num_gpus is not None:
                cmd += ["--num-gpus", str(self.num_gpus)]
            started = self.run(cmd, timeout=self.start_timeout)
            if started.returncode != 0:
                raise RuntimeError(f"ray start failed ({started.returncode}): {started.stderr[-2000:]}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the cluster; bounded, and safe to call more than once. An isolated cluster ends with its namespace:
        killing the namespace's first process kills every process in it (Ray's, and commands still running there)."""
        if self._holder is not None:
            self._holder.send_signal(signal.SIGKILL)
            self._holder.wait(timeout=30)
            self._holder, self._prefix = None, []
        elif not self.isolated_network:
            try:
                self.run(RAY + ["stop", "--force"], timeout=60)
            except subprocess.TimeoutExpired:
                pass

    def _enter_namespace(self) -> None:
        if not namespaces_available():
            raise RuntimeError("isolated_network needs root and unshare, nsenter (util-linux) and ip (iproute2)")
        self._holder = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
                                         "sh", "-c", "ip link set lo up && exec sleep infinity"],
                                        preexec_fn=_killed_with_parent)
        deadline = time.monotonic() + 10
        children = pathlib.Path(f"/proc/{self._holder.pid}/task/{self._holder.pid}/children")
        while time.monotonic() < deadline:
            inner = children.read_text().split() if children.exists() else []
            if inner:
                self._prefix = ["nsenter", "--target", inner[0], "--net", "--pid", "--mount"]
                up = self.run(["ip", "-o", "link", "show", "lo"], timeout=10)
                if up.returncode == 0 and "UP" in up.stdout.split(">")[0]:
                    return
            if self._holder.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("could not set up the private network namespace (unshare needs root)")


def _killed_with_parent() -> None:
    """In the namespace's holder: die (and so end the cluster) when the process that started it dies, even by SIGKILL."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
