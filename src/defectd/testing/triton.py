"""A local Triton Inference Server process on free ports, from the ``nvidia-pytriton`` wheel.

The wheel ships the real ``tritonserver`` binary (2.51) with the Python backend only, so this
serves repositories in the ``python`` form (``defectd build-engine --backend triton
--triton-kind python``): ONNX Runtime on the CPU, inside Triton. For tests, benchmarks and a
plant's trial of the ``triton`` engine without a GPU host; production runs NVIDIA's container.

The backend directory is assembled once per server in ``workdir``: the wheel's Python backend,
the backend stub for this interpreter's Python version, and links to this environment's numpy
(the stub runs an isolated interpreter, and the backend imports numpy before the model can put
the environment on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from defectd.errors import EngineError
from defectd.testing.mosquitto import free_port


def pytriton_root() -> Path | None:
    """The installed ``pytriton`` package directory (not imported), or None."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def server_missing() -> str | None:
    """Why no local server can start here (None when one can)."""
    root = pytriton_root()
    if root is None:
        return (
            "the nvidia-pytriton wheel (tritonserver) is not installed: "
            "pip install --no-deps nvidia-pytriton==0.7.0"
        )
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return f"{binary} is missing from the nvidia-pytriton wheel"
    stub = _stub(root)
    if not stub.is_file():
        return f"no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed: pip install defectd[triton]"
    return None


def _stub(root: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"


def backend_dir(dest: Path) -> Path:
    """Assemble the backend directory in ``dest`` (see the module docstring) and return it."""
    root = pytriton_root()
    if root is None:
        raise EngineError("nvidia-pytriton is not installed")
    python = dest / "python"
    if python.exists():
        return dest
    shutil.copytree(root / "tritonserver" / "backends" / "python", python)
    shutil.copy2(_stub(root), python / "triton_python_backend_stub")
    site = Path(sysconfig.get_paths()["platlib"])
    for name in ("numpy", "numpy.libs"):
        if (site / name).exists():
            (python / name).symlink_to(site / name)
    return dest


class TritonServer:
    """One ``tritonserver`` process serving ``repository`` on free ports (kept across restarts).

    ``grpc_url``/``http_url`` are ``host:port`` for ``TritonOptions.url``. ``start`` waits until
    the server and every model in the repository are ready; ``kill`` is a SIGKILL (a crash).
    """

    def __init__(self, repository: Path, workdir: Path, *, host: str = "127.0.0.1") -> None:
        missing = server_missing()
        if missing is not None:
            raise EngineError(missing)
        root = pytriton_root()
        assert root is not None
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.http_port = free_port(host)
        self.grpc_port = free_port(host)
        self.metrics_port = free_port(host)
        self._binary = root / "tritonserver" / "bin" / "tritonserver"
        self._libs = root.parent / "nvidia_pytriton.libs"
        self._backends = backend_dir(self.workdir / "backends")
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start the server; return once it answers ready. Raises ``EngineError`` with the end
        of its log when it exits or is not ready within ``timeout`` s."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (str(self._libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        cmd = [
            str(self._binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ]
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise EngineError(
                    f"tritonserver exited with {self._proc.returncode}: {self.tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise EngineError(f"tritonserver not ready within {timeout:g} s: {self.tail()}")

    def ready(self) -> bool:
        """The server answers ``/v2/health/ready`` (every model loaded)."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        keep = [ln for ln in text if not ln.startswith("I")] or text
        return " | ".join(keep[-lines:])

    def kill(self) -> None:
        """SIGKILL the server (a crash: no drain) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
