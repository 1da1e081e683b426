"""Start and stop a real MONAI Label server for a prepared app, on the loopback interface by default."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from medssl3d.serving.app import PreparedApp
from medssl3d.serving.environment import venv_python

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8000
#: Start-up imports torch, MONAI and the app and parses the bundle: a minute or more on a busy 2-core CPU.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 1.0
LOG_TAIL_CHARS = 4000


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse any address but 127.0.0.1 unless ``allow_remote``: the server has no authentication by default.

    Raises:
        ValueError: ``host`` is not loopback and ``allow_remote`` is False.
    """
    if host != LOOPBACK and not allow_remote:
        raise ValueError(
            f"host {host!r} would expose the MONAI Label server beyond this machine; it binds to {LOOPBACK} "
            "unless asked (--allow-remote)"
        )


class LabelServer:
    """A MONAI Label server process for one prepared app; a context manager that stops it on exit.

    Args:
        app: the app from :func:`medssl3d.serving.app.prepare_app`.
        studies: the studies folder (MONAI Label's local datastore: images, and ``labels/final``).
        env_root: the MONAI Label environment.
        host: address to bind; only 127.0.0.1 unless ``allow_remote``.
        port: TCP port.
        allow_remote: allow another address than loopback.
        log_path: where the server's output goes (default ``<app>/server.log``).
        extra_conf: more ``--conf key value`` pairs for the app.
    """

    def __init__(
        self,
        app: PreparedApp,
        studies: str | os.PathLike,
        env_root: str | os.PathLike,
        *,
        host: str = LOOPBACK,
        port: int = DEFAULT_PORT,
        allow_remote: bool = False,
        log_path: str | os.PathLike | None = None,
        extra_conf: dict[str, str] | None = None,
    ):
        check_host(host, allow_remote)
        self.app = app
        self.studies = Path(studies).resolve()
        self.env_root = Path(env_root)
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path else app.app_dir / "server.log"
        self.conf = {"models": app.model_name, "zoo_source": "github", "sam2": "false", "preload": "false",
                     **(extra_conf or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's base address, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The ``start_server`` command line (the environment's interpreter, so no shell script or PATH)."""
        cmd = [str(venv_python(self.env_root)), "-m", "monailabel.main", "start_server",
               "--app", str(self.app.app_dir), "--studies", str(self.studies),
               "--host", self.host, "--port", str(self.port)]
        for key, value in self.conf.items():
            cmd += ["--conf", key, value]
        return cmd

    def environment(self) -> dict[str, str]:
        """The server's environment: the app's medssl3d copy (if any) first on ``PYTHONPATH``; no GPU needed."""
        env = dict(os.environ)
        code = str(self.app.python_path) if self.app.python_path else None
        env["PYTHONPATH"] = os.pathsep.join(p for p in (code, env.get("PYTHONPATH")) if p)
        env.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
        return env

    def log_tail(self) -> str:
        """The end of the server's output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT_S) -> LabelServer:
        """Start the server and wait until ``GET /info/`` answers.

        Raises:
            RuntimeError: the server exited or did not answer within ``timeout`` (the message ends with
                its log).
        """
        self.studies.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting MONAI Label: %s", " ".join(self.command()))
        with open(self.log_path, "wb") as log:
            # A session of its own, so stop() can end the server and any worker it forked by group.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                cwd=self.app.app_dir, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"MONAI Label exited with status {self.process.returncode}; {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=POLL_INTERVAL_S * 10) as response:
                    if response.status == 200:
                        logger.info("MONAI Label is serving %s at %s", self.app.model_name, self.url)
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"MONAI Label did not answer within {timeout:.0f} s; {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server by its process group: SIGTERM, then SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()

    def wait(self) -> int:
        """Block until the server exits (Ctrl-C stops it); returns its exit status."""
        if self.process is None:
            raise RuntimeError("the server was not started")
        try:
            return self.process.wait()
        except KeyboardInterrupt:
            self.stop()
            return 0

    def __enter__(self) -> LabelServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
