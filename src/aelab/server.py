"""A tracking server for many writers: ``mlflow server`` on a PostgreSQL database, with an artifact directory.

sqlite is the embedded store for one user. For a team, or for parallel jobs on several machines, run
``make server`` (``python -m aelab.server``): it keeps a PostgreSQL cluster in ``.mlflow-server/postgres`` (Debian's
``postgresql`` package; created on first use), its artifacts in ``.mlflow-server/artifacts``, serves both on
127.0.0.1, and prints the ``MLFLOW_TRACKING_URI`` to export for the stages. Ctrl-C stops both.

The same start-wait-stop code serves a model: :func:`model_server` runs ``mlflow models serve`` (a registered model
such as ``models:/aelab-denoiser@pipeline``) on loopback, and :func:`invoke` sends it arrays (``aelab.serve_bench``
times it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from aelab.errors import reported

START_TIMEOUT_S = 180  # a cold `mlflow server` takes ~25 s on a busy 2-core machine
PG_USER = "postgres"  # the cluster's superuser, and the system user that runs it when we are root
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback servers: never through a proxy


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(program: str) -> str:
    """Path of a PostgreSQL server program (initdb, pg_ctl): Debian keeps them in /usr/lib/postgresql/<v>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=lambda p: int(Path(p).parts[-3]))
    path = found[-1] if found else shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"PostgreSQL's {program} not found: install it (Debian: apt-get install postgresql)")
    return path


def _as_pg_user(cmd: list[str]) -> list[str]:
    """``cmd`` run as the postgres system user when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_as_pg_user(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


@contextmanager
def postgres(folder: Path, port: int, database: str = "mlflow") -> Iterator[str]:
    """A PostgreSQL cluster in ``folder`` (initialised there on first use) listening on 127.0.0.1:``port`` only,
    with ``database`` created; yields its SQLAlchemy URI and stops the cluster afterwards."""
    folder = Path(folder).resolve()
    data = folder / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, PG_USER)
    if not (data / "PG_VERSION").exists():
        _run([postgres_bin("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"], "initdb")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    _run([postgres_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-o", options, "-w",
          "-t", str(START_TIMEOUT_S), "start"], "starting PostgreSQL")
    try:
        _create_database(port, database)
        yield f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/{database}"
    finally:
        _run([postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "stopping PostgreSQL")


def _create_database(port: int, database: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()


@contextmanager
def mlflow_server(backend_uri: str, port: int, cwd: Path, artifacts: Path | None = None,
                  workers: int = 1) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:``port`` against ``backend_uri`` (serving ``artifacts`` when given); yields
    its URL once ``/health`` answers, and always stops it (the whole process group: the server starts workers)."""
    cmd = [mlflow_program(), "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers)]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(Path(artifacts).resolve())]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job consumers
    with serving(cmd, cwd, port, "/health", "mlflow_server.log", env, "mlflow server") as url:
        yield url


@contextmanager
def model_server(model_uri: str, port: int, cwd: Path, tracking_uri: str, workers: int = 1) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` (``models:/aelab-denoiser@pipeline``, ``runs:/...``, a folder),
    resolved against ``tracking_uri``, in this environment (``--env-manager local``: no virtualenv is built) on
    127.0.0.1:``port``; yields its URL once ``/ping`` answers (the model is loaded then) and always stops it.
    :func:`invoke` sends it arrays."""
    cmd = [mlflow_program(), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with serving(cmd, cwd, port, "/ping", "model_server.log", env, "mlflow models serve") as url:
        yield url


def mlflow_program() -> str:
    """The ``mlflow`` command of this Python's environment (the one on PATH otherwise)."""
    beside = Path(sys.executable).with_name("mlflow")
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if found is None:
        raise FileNotFoundError("the mlflow command is not installed (pip install mlflow)")
    return found


@contextmanager
def serving(cmd: list[str], cwd: Path, port: int, health: str, log_name: str, env: dict[str, str], what: str,
            poll_s: float = 0.1) -> Iterator[str]:
    """Run ``cmd`` (a server on 127.0.0.1:``port``) in ``cwd``, in a process group of its own, its output in
    ``cwd/log_name``; yield its URL once GET ``health`` answers 200, and always stop the whole group (servers start
    workers). A server that exits first, or does not answer within START_TIMEOUT_S, raises with the end of its log."""
    log_path = Path(cwd) / log_name
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if NO_PROXY.open(f"{url}{health}", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no {health} after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(poll_s)
        yield url
    finally:
        _stop_group(proc)


class ServingError(RuntimeError):
    """A served model's error answer: ``status`` (HTTP) and the server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def invoke(url: str, inputs: np.ndarray, timeout: float = 120) -> np.ndarray:
    """The predictions of the model served at ``url`` (:func:`model_server`) for the array ``inputs``: POST
    ``{"inputs": <nested lists>}`` to ``/invocations`` as ``application/json``, MLflow's tensor request; the answer
    ``{"predictions": <nested lists>}`` comes back as a float32 array. An error answer raises :class:`ServingError`
    with MLflow's message (and the model's own error, from the traceback MLflow sends, where there is one)."""
    body = json.dumps({"inputs": np.asarray(inputs).tolist()}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except ValueError:
            raise ServingError(err.code, text) from None
        cause = answer.get("stack_trace", "").strip().splitlines()[-1:]  # "aelab.pyfunc.InputError: ..."
        raise ServingError(err.code, "\n".join([answer.get("message", text), *cause])) from None


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group ``proc`` leads (a server and the workers it started): SIGTERM, SIGKILL for what still
    runs after 20 s; return once none of it runs (its port is free then), not merely once ``proc`` has exited."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while (proc.poll() is None or _group_running(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None and not _group_running(proc.pid):
            break
    proc.poll()


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs: /proc on Linux, where zombies (exited, waiting for a parent
    to reap them) do not count; elsewhere whether the group can be signalled."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"), help="PostgreSQL data and artifacts")
    parser.add_argument("--port", type=int, default=5001, help="the tracking server's port")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port (127.0.0.1 only)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both cleanly on SIGTERM as on Ctrl-C
    with (postgres(args.dir / "postgres", args.pg_port) as db,
          mlflow_server(db, args.port, args.dir, args.dir / "artifacts", args.workers) as url):
        print(f"MLflow tracking server on {url} (PostgreSQL on 127.0.0.1:{args.pg_port}, artifacts in "
              f"{args.dir / 'artifacts'}).\nIn another shell:  export MLFLOW_TRACKING_URI={url}\nCtrl-C stops both.",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    with reported("aelab.server"):
        main()
