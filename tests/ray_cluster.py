"""A real local Ray cluster for tests and benchmarks: a head and optional worker nodes.

Each node is a ``ray start --block`` process group of its own with logical GPUs (no GPU needed), its own
temp folder, token authentication off (a throwaway cluster on this machine only), and
this checkout on ``PYTHONPATH`` so the workers import the charbuild under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).with_name("ray")


def cluster_env() -> dict[str, str]:
    """The environment of every process that talks to the test cluster (nodes and drivers)."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # a builtin training on a node picks its torch threads from the load; a fixed count makes its
    # bytes comparable with a local training's (tests set the same there)
    env["CHARBUILD_TORCH_THREADS"] = "1"
    env["CHARBUILD_DEVICE"] = "cpu"  # and the CPU where a GPU is (GPU kernels need not repeat bit for bit)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --head`` (and ``ray start --address``) with logical GPUs; :meth:`stop` ends all."""

    def __init__(self, head_gpus: int = 1, head_cpus: int = 2, workers: tuple[tuple[int, int], ...] = ((1, 1),),
                 object_store: int = 150 * 2**20, client_server: bool = False):
        # short path: Ray's unix socket names must stay under ~107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="cbray"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = cluster_env()
        self.object_store = object_store
        self.nodes: list[subprocess.Popen] = []
        #: ``ray://…`` of the head's Ray Client server (``client_server=True``), else None
        self.client_address = None
        head = ["--head", f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp}"]
        if client_server:
            client_port = _free_port()
            head.append(f"--ray-client-server-port={client_port}")
            self.client_address = f"ray://127.0.0.1:{client_port}"
        self._start(head, head_gpus, head_cpus)
        for gpus, cpus in workers:
            self._start([f"--address={self.address}"], gpus, cpus)
        self.wait_for_nodes(1 + len(workers))

    def _start(self, args: list[str], gpus: int, cpus: int) -> None:
        cmd = [str(RAY_BIN), "start", "--block", *args, f"--num-gpus={gpus}", f"--num-cpus={cpus}",
               f"--object-store-memory={self.object_store}"]
        log = open(self.temp / f"node-{len(self.nodes)}.log", "wb")
        self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
        if len(self.nodes) == 1:
            self.wait_for_nodes(1)

    def python(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a fresh driver process connected to the cluster; return its stdout."""
        prelude = f"import ray\nray.init(address={self.address!r}, log_to_driver=False, logging_level='ERROR')\n"
        out = subprocess.run([sys.executable, "-c", prelude + code], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"driver failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        alive, error = 0, ""
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.nodes):
                break
            try:
                alive = int(self.python("print(sum(1 for x in ray.nodes() if x['Alive']))", timeout=60).strip() or 0)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                error = str(e)
            if alive >= n:
                return
            time.sleep(1)
        logs = "".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.temp.glob("node-*.log")))
        self.stop()
        raise RuntimeError(f"only {alive} of {n} Ray nodes came up; {error[-2000:]}\n{logs}")

    def free_gpus(self) -> float:
        return float(self.python("print(ray.available_resources().get('GPU', 0))").strip())

    def stop(self) -> None:
        """Stop every node this object started (their process groups only), workers first."""
        for proc in reversed(self.nodes):
            _stop_group(proc)
        self.nodes.clear()
        shutil.rmtree(self.temp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader for a moment
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
