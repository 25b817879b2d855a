"""A tracking server for many writers: ``mlflow server`` on a PostgreSQL database, with an artifact directory.

sqlite is the embedded store for one user. For a team, or for parallel jobs on several machines, run
``make server`` (``python -m aelab.server``): it keeps a PostgreSQL cluster in ``.mlflow-server/postgres`` (Debian's
``postgresql`` package; created on first use), its artifacts in ``.mlflow-server/artifacts``, serves both on
127.0.0.1, and prints the ``MLFLOW_TRACKING_URI`` to export for the stages. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 180  # a cold `mlflow server` takes ~25 s on a busy 2-core machine
PG_USER = "postgres"  # the cluster's superuser, and the system user that runs it when we are root


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
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else shutil.which("mlflow"), "server", "--backend-store-uri",
           backend_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(Path(artifacts).resolve())]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job consumers
    log_path = Path(cwd) / "mlflow_server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if no_proxy.open(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server: no /health after {START_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


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
    main()
