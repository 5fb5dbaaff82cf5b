"""The build's one Ray driver: a small local process that holds the Ray connection for every training.

Why: with ``doit -n N`` every training runs in its own doit process. If each of those became a
Ray driver itself, each would import Ray and connect (2-5 s of CPU on a small machine), each
would be a Ray *job* of its own (Ray keeps worker processes per job, so no training could reuse
the worker a previous one left idle), and each would put the base model into the object store
again (eight copies of a 7 GB SDXL model for eight trainings). Instead the first training of a
build starts this process, ``python -m charbuild.train.executors.driver``, in a session of its
own. Every training sends it its job over a local socket (:mod:`multiprocessing.connection`,
authenticated with a random key) and gets the worker's messages back
(:mod:`.worker`: ``start``, ``log``, ``done``; here also ``lost``, ``error``, ``unfit``, ``gone``).

The driver connects to Ray once, puts each input and each model once (:mod:`.payload`'s caches
live as long as it does), submits one task per training and relays its messages. When a
training's connection closes before its end (Ctrl-C, SIGTERM, or a killed doit process) it
cancels that task (``ray.cancel(force=True)``; the worker's watchdog stops the trainer). After
``CHARBUILD_RAY_DRIVER_IDLE`` seconds (default 30) with no training it exits, and a local Ray
instance it started goes with it.

Its address and key are in ``<locks>/ray-driver.json`` (written atomically once it listens, this
user's only), its output in ``<locks>/ray-driver.log`` (appended, one header line per driver);
``<locks>/ray-start.lock`` makes one process start it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Iterator, Mapping

from ...errors import TrainingError
from ...fsutil import write_text_atomic
from ..job import TrainJob
from ..process import own_group_kwargs

DRIVER_FILE = "ray-driver.json"
DRIVER_LOG = "ray-driver.log"
START_LOCK = "ray-start.lock"
IDLE_ENV = "CHARBUILD_RAY_DRIVER_IDLE"
DEFAULT_IDLE_S = 30.0
#: Seconds a new driver may take to connect to Ray and listen (a cold local instance is slow).
START_TIMEOUT_S = 180.0
#: A line of the driver's log that says why it could not start; the training's error quotes it.
ERROR_PREFIX = "ERROR: "


def driver_spec(job: TrainJob) -> dict[str, Any]:
    """What a driver is for: the cluster address, or (address None) a local instance and its GPUs."""
    address = job.trainer.ray_address
    return {"address": address, "gpus": len(job.trainer.gpus) if address is None else None}


# ------------------------------------------------------------------------------------------
# the side of a training (a doit process)
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def driver_connection(job: TrainJob, lock_dir: Path) -> Iterator[tuple[Connection, int]]:
    """(a connection to this build's driver for ``job``'s cluster, the driver's pid), starting
    the driver if none runs. Closing the connection before the training's ``done`` message
    cancels the training.
    """
    conn, pid = _join_or_start(driver_spec(job), lock_dir)
    try:
        yield conn, pid
    finally:
        conn.close()


def _join_or_start(spec: Mapping[str, Any], lock_dir: Path) -> tuple[Connection, int]:
    from filelock import FileLock

    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / START_LOCK)):
        info = _read_info(lock_dir)
        if info is not None and info.get("spec") == dict(spec):
            joined = _try_connect(info)
            if joined is not None:
                return joined
        proc = _spawn(spec, lock_dir)
        info = _wait_until_listening(proc, lock_dir)
        joined = _try_connect(info)
        if joined is None:
            raise TrainingError("the build's Ray driver started but does not answer; see its log",
                                path=lock_dir / DRIVER_LOG)
        return joined


def _read_info(lock_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((lock_dir / DRIVER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _try_connect(info: Mapping[str, Any]) -> tuple[Connection, int] | None:
    """(a connection, the pid) to the driver of ``info`` once it has said hello; None if it is gone."""
    try:
        conn = Client(("127.0.0.1", int(info["port"])), family="AF_INET", authkey=bytes.fromhex(info["key"]))
    except (OSError, EOFError, ValueError, KeyError, TypeError, AuthenticationError):  # gone, or another process
        return None
    try:  # the driver counts this training as soon as it says hello: it will not exit idle now
        hello = conn.recv() if conn.poll(30) else {}
        if hello.get("kind") == "hello":
            return conn, int(hello["pid"])
    except (OSError, EOFError, AttributeError):
        pass
    conn.close()
    return None


def _spawn(spec: Mapping[str, Any], lock_dir: Path) -> subprocess.Popen:
    (lock_dir / DRIVER_FILE).unlink(missing_ok=True)
    with (lock_dir / DRIVER_LOG).open("ab") as log:  # appended: an earlier driver's end stays readable
        log.write(f"--- a driver starts at {time.strftime('%Y-%m-%d %H:%M:%S')} for {dict(spec)}\n".encode("utf-8"))
        log.flush()
        return subprocess.Popen([sys.executable, "-m", "charbuild.train.executors.driver", str(lock_dir),
                                 json.dumps(dict(spec))], cwd=str(lock_dir), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT,
                                **own_group_kwargs(detached=True))  # the build's Ctrl-C/SIGTERM: not for it


def _wait_until_listening(proc: subprocess.Popen, lock_dir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _read_info(lock_dir)
        if info is not None and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            raise TrainingError(_start_failure(lock_dir, proc.returncode), path=lock_dir / DRIVER_LOG)
        time.sleep(0.05)
    proc.kill()
    last = _log_lines(lock_dir)[-1:]
    raise TrainingError(f"the build's Ray driver did not start within {START_TIMEOUT_S:.0f} s"
                        + (f"; its log ends: {last[0]}" if last else ""), path=lock_dir / DRIVER_LOG)


def _log_lines(lock_dir: Path) -> list[str]:
    try:
        return (lock_dir / DRIVER_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _start_failure(lock_dir: Path, rc: int) -> str:
    lines = _log_lines(lock_dir)
    lines = lines[max((i for i, line in enumerate(lines) if line.startswith("--- a driver starts")), default=0):]
    said = [line[len(ERROR_PREFIX):] for line in lines if line.startswith(ERROR_PREFIX)]
    if said:
        return said[-1]
    tail = "\n".join("    " + line for line in lines[-8:])
    return f"the build's Ray driver exited with status {rc} before it listened; last lines of its log:\n{tail}"


# ------------------------------------------------------------------------------------------
# the driver process
# ------------------------------------------------------------------------------------------


class Driver:
    """The driver process's state: its listener, the trainings in progress, when it was last busy."""

    def __init__(self, spec: Mapping[str, Any], lock_dir: Path, idle_s: float):
        self.spec, self.lock_dir, self.idle_s = dict(spec), lock_dir, idle_s
        self.active = 0
        self.last_busy = time.monotonic()
        #: set when the cluster went away: the driver exits as soon as no training is left
        self.retired = False
        self.state = threading.Lock()

    def serve(self) -> None:
        """Connect to Ray, listen, leave the address file, and serve trainings until idle."""
        from .cluster import connect

        try:
            connect(self.spec["address"], gpus=int(self.spec.get("gpus") or 1))
        except TrainingError as e:
            print(ERROR_PREFIX + e.message, flush=True)
            sys.exit(3)
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), family="AF_INET", authkey=key)
        port = listener.address[1]
        write_text_atomic(self.lock_dir / DRIVER_FILE,  # it holds the key: this user's only
                          json.dumps({"pid": os.getpid(), "port": port, "key": key.hex(), "spec": self.spec}) + "\n",
                          mode=0o600)
        print(f"driver pid {os.getpid()} listening on 127.0.0.1:{port} for {self.spec}", flush=True)
        threading.Thread(target=self._exit_when_idle, daemon=True).start()
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError) as e:  # a wrong key, or a reset
                print(f"refused a connection: {type(e).__name__}: {e}", flush=True)
                continue
            with self.state:
                self.active += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _exit_when_idle(self) -> None:
        from filelock import FileLock, Timeout

        while True:
            time.sleep(min(1.0, self.idle_s / 4))
            with self.state:
                idle = self.active == 0 and (self.retired or time.monotonic() - self.last_busy >= self.idle_s)
            if not idle:
                continue
            try:  # a training that is joining holds this lock until the hello: then it counts
                with FileLock(str(self.lock_dir / START_LOCK), timeout=0):
                    with self.state:
                        if self.active:
                            continue
                    info = _read_info(self.lock_dir)
                    if info is not None and info.get("pid") == os.getpid():
                        (self.lock_dir / DRIVER_FILE).unlink(missing_ok=True)
            except Timeout:
                continue
            print("the cluster went away: exiting" if self.retired else f"idle for {self.idle_s:g} s: exiting",
                  flush=True)
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
            os._exit(0)

    def _handle(self, conn: Connection) -> None:
        try:
            conn.send({"kind": "hello", "pid": os.getpid()})
            request = conn.recv()
            if request.get("op") == "train":
                self._train(conn, request)
        except (OSError, EOFError):
            pass  # the training went away: _train has cancelled its task
        except Exception as e:  # noqa: BLE001 - reported to the training, which fails with it
            with contextlib.suppress(OSError):
                conn.send({"kind": "error", "text": f"{type(e).__name__}: {e}"})
        finally:
            conn.close()
            with self.state:
                self.active -= 1
                self.last_busy = time.monotonic()

    def _retire_if_cluster_gone(self, conn: Connection) -> bool:
        """If the cluster's address no longer answers: tell the training, retire, and return True.

        Why: Ray ends a driver only about 60 s after it lost the cluster's GCS, and until then
        every call into Ray waits. A training that joins in that time fails at once instead,
        and the driver exits, so the build's next training starts a new one (which fails at
        once too while the cluster is down, or connects to the cluster that is back).
        """
        from .cluster import check_reachable

        address = self.spec.get("address")
        if address is None:  # a local instance this process started: it lives as long as we do
            return False
        try:
            check_reachable(address, timeout=5.0)
            return False
        except TrainingError as e:
            with self.state:
                self.retired = True
            print(f"{e.message}: retiring", flush=True)
            conn.send({"kind": "gone", "text": f"{e.message} (it went away while this build's Ray driver was connected "
                                               "to it)"})
            return True

    def _train(self, conn: Connection, request: Mapping[str, Any]) -> None:
        import ray

        from .payload import build_payload, put_bytes
        from .cluster import fitting_nodes, lost_errors, submit_training
        from .settings import ray_task_options

        job = TrainJob.from_dict(request["job"])
        if self._retire_if_cluster_gone(conn):
            return
        if not fitting_nodes(job.trainer.resources):
            conn.send({"kind": "unfit", "cluster": dict(ray.cluster_resources())})
            return
        payload = build_payload(job, env=request.get("env") or {})
        print(f"{job.label}: submitting; put into the object store so far: {put_bytes['inputs']} bytes of inputs, "
              f"{put_bytes['model']} bytes of model", flush=True)
        opts = dict(ray_task_options(job.trainer.resources), name=f"charbuild train {job.label}")
        client = str(self.spec.get("address") or "").startswith("ray://")  # Ray Client
        messages, cancel = submit_training(payload, opts, client=client)
        finished = threading.Event()

        def cancel_when_the_training_leaves() -> None:
            with contextlib.suppress(OSError, EOFError):
                conn.recv()  # nothing is sent while it trains: this returns when the connection closes
            if not finished.is_set():
                print(f"{job.label}: the training's connection closed: cancelling its task", flush=True)
                with contextlib.suppress(Exception):
                    cancel()

        threading.Thread(target=cancel_when_the_training_leaves, daemon=True).start()
        try:
            for msg in messages:
                if msg["kind"] == "done":
                    finished.set()  # before the send: the training closes its end as soon as it has this
                conn.send(msg)
                if finished.is_set():
                    return
            conn.send({"kind": "error", "text": "the worker ended without a result"})
        except lost_errors(ray) as e:
            text = str(e).strip()
            conn.send({"kind": "lost", "error": type(e).__name__, "text": text.splitlines()[0] if text else ""})
        except ray.exceptions.TaskCancelledError:
            pass  # cancelled above: nobody is listening
        except ray.exceptions.RayTaskError as e:  # an error in our worker code, e.g. the trainer cannot start
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
            conn.send({"kind": "error", "text": str(cause)})
        except (OSError, EOFError):
            with contextlib.suppress(Exception):
                cancel()
            raise
        finally:
            finished.set()


def idle_seconds() -> float:
    """``CHARBUILD_RAY_DRIVER_IDLE`` if set to a number, else :data:`DEFAULT_IDLE_S`."""
    try:
        return max(0.5, float(os.environ.get(IDLE_ENV, "")))
    except ValueError:
        return DEFAULT_IDLE_S


def main(argv: list[str] | None = None) -> None:
    """``python -m charbuild.train.executors.driver LOCK_DIR SPEC_JSON``: run the driver until idle."""
    argv = sys.argv[1:] if argv is None else argv
    lock_dir, spec = Path(argv[0]), json.loads(argv[1])
    Driver(spec, lock_dir, idle_seconds()).serve()


if __name__ == "__main__":
    main()
