"""What the fault bench and the runtime tests both need to make a fault real: a private mosquitto
broker that can be stopped, restarted and killed, and the frame chunks of an AVI to corrupt.

Plain stdlib; tests import it from bench/ as tests/test_faults_bench.py imports the bench itself.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Broker", "avi_frame_chunks", "mosquitto_binary"]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


class Broker:
    """A private mosquitto on 127.0.0.1:<free port>, with persistence so it can be stopped and restarted;
    with `user`, only that user and `password` may connect (a password file, as a line would run it)."""

    def __init__(self, workdir: Path, user: str | None = None, password: str | None = None) -> None:
        binary, tool = mosquitto_binary(), shutil.which("mosquitto_passwd")
        if binary is None or (user is not None and tool is None):
            raise RuntimeError("mosquitto (and mosquitto_passwd for a password) needed: apt-get install mosquitto")
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (workdir / "db").mkdir(exist_ok=True)
        auth = "allow_anonymous true\n"
        if user is not None:
            passwd = workdir / "passwd"
            subprocess.run([tool, "-b", "-c", str(passwd), user, password or ""], check=True, capture_output=True)
            auth = f"allow_anonymous false\npassword_file {passwd}\n"
        self.conf = workdir / "mosquitto.conf"
        # `user`: run as whoever runs this (as root mosquitto would otherwise switch to the 'mosquitto'
        # user, which cannot write the persistence db into a private tmp dir).
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{auth}user {getpass.getuser()}\n"
                             f"persistence true\npersistence_location {workdir / 'db'}/\n")
        self.binary, self.log = binary, workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence db and exits
            self.proc.wait(timeout=10)
        self.proc = None


def avi_frame_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each video chunk's payload in the 'movi' list of an AVI."""
    pos, chunks = data.index(b"movi") + 4, []
    while pos + 8 <= len(data) and data[pos:pos + 4] != b"idx1":
        fourcc, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if fourcc[2:] in (b"dc", b"db"):
            chunks.append((pos + 8, size))
        pos += 8 + size + (size & 1)
    return chunks
