"""The Ray calls of the Ray executor: connect, check, fit, submit.

This module imports Ray only inside its functions and runs where Ray is imported: in the
build's Ray driver (:mod:`.driver`) and for the dry run (:func:`.ray.dry_run_lines`). The
launcher side, in the build's own process, is :mod:`.ray`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Mapping

from ...errors import TrainingError
from .settings import INSTALL_HINT, ray_task_options

_remote_fns: dict[str, Any] = {}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TrainingError(f"trainer.executor = \"ray\" needs Ray: run `{INSTALL_HINT}`") from None
    return ray


def connect(address: str | None, gpus: int = 1) -> None:
    """Connect this process to Ray once: to ``address``, or to a local instance it starts
    (``gpus`` logical GPUs; it lives as long as this process: the build's driver)."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    if address is not None:
        check_reachable(address)
    with _keep_sigterm_handler():
        common = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
        try:
            if address is None:
                ray.init(num_gpus=gpus, include_dashboard=False, **common)
            else:
                init_with_retries(lambda: ray.init(address=address, **common), ray.shutdown, address)
        except ConnectionError as e:
            raise _unreachable(address, e) from None


#: How often a Ray Client connection is tried when the server fails to start its side of it.
CLIENT_ATTEMPTS = 4
#: What ``ray.init`` says when the proxy's per-connection server crashed at once: the proxy saw it
#: fail, or found it already a zombie when it read its command line (``start_specific_server``:
#: psutil's ZombieProcess, seen on a loaded 2-core CI machine).
CLIENT_SERVER_CRASHED = ("Starting Ray client server failed", "ZombieProcess")


def init_with_retries(init, shutdown, address: str, attempts: int = CLIENT_ATTEMPTS, pause: float = 1.0) -> None:
    """``init()``, tried again (after ``shutdown()``) while a Ray Client server fails to start
    the server process of this connection.

    Why: the Ray Client proxy forks that process from a busy gRPC process, and the child
    sometimes crashes at once (ray-project/ray#63202): ``ray.init`` then fails with
    "Initialization failure from server … Starting Ray client server failed". A new
    connection gets a new process and normally works. Any other failure is raised at once;
    this one (:data:`CLIENT_SERVER_CRASHED`), after ``attempts`` tries, as a :class:`TrainingError`
    that says what to do.
    """
    for attempt in range(1, attempts + 1):
        try:
            init()
            return
        except ConnectionError as e:
            if not any(sign in str(e) for sign in CLIENT_SERVER_CRASHED):
                raise
            if attempt == attempts:
                raise TrainingError(
                    f"the Ray Client server at {address!r} failed {attempts} times to start its side of the "
                    "connection (ray-project/ray#63202); its reason is in ray_client_server_*.err in the "
                    "head's Ray logs. Try again, or set trainer.ray_address to the cluster's GCS address "
                    "(HOST:6379), which does not go through Ray Client") from None
            print(f"the Ray Client server at {address} failed to start this connection's server "
                  f"(attempt {attempt}/{attempts}, ray-project/ray#63202): trying again", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                shutdown()
            time.sleep(pause * attempt)


def tcp_target(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` address; None for ``"auto"`` and the like."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once when nothing listens at ``address``: ``ray.init`` would retry for minutes."""
    import socket

    target = tcp_target(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or e) from None


def _unreachable(address: str | None, why) -> TrainingError:
    return TrainingError(f"cannot reach the Ray cluster at {address!r}: {why}; start one (`ray start --head`) "
                         "or fix trainer.ray_address")


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Undo the SIGTERM handler ``ray.init`` installs (it exits at once): the build's own handler
    turns SIGTERM into KeyboardInterrupt, which cancels the remote task and keeps doit's records."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and old is not None:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, old)


def _remote(name: str):
    """The worker function ``name`` of :mod:`.worker` as a Ray remote function (made once per process)."""
    if name not in _remote_fns:
        ray = _import_ray()
        from . import worker

        _remote_fns[name] = ray.remote(getattr(worker, name))
    return _remote_fns[name]


#: Seconds between two looks at a Ray Client training's task while its queue is empty.
CLIENT_POLL_S = 0.5


def submit_training(payload: Mapping[str, Any], opts: Mapping[str, Any], client: bool = False):
    """Submit one training; (an iterator of its worker's messages, a function that cancels it).

    The iterator raises what Ray raises for the task (a lost worker, the worker code's error,
    the cancellation). Normally the task is a streaming generator (:func:`.worker.train_on_worker`).
    Ray Client (``ray://``) cannot stream, so there the task puts the same messages into a
    queue actor (:func:`.worker.train_into_queue`) that this side reads.
    """
    ray = _import_ray()
    common = dict(max_retries=0, retry_exceptions=False, **opts)
    if not client:
        gen = _remote("train_on_worker").options(num_returns="streaming", **common).remote(payload)

        def streamed():
            for ref in gen:
                yield ray.get(ref)

        return streamed(), lambda: ray.cancel(gen, force=True)
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    ref = _remote("train_into_queue").options(**common).remote(payload, queue)

    def queued():
        try:
            while True:
                try:
                    yield queue.get(timeout=CLIENT_POLL_S)
                    continue
                except Empty:
                    pass
                if ray.wait([ref], timeout=0)[0]:
                    ray.get(ref)  # raises the task's failure
                    while not queue.empty():  # it put everything before it returned
                        yield queue.get_nowait()
                    return
        finally:
            with contextlib.suppress(Exception):
                ray.kill(queue.actor)

    return queued(), lambda: ray.cancel(ref, force=True)


def fitting_nodes(resources: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The live nodes of the connected cluster whose total resources can hold one training."""
    ray = _import_ray()
    opts = ray_task_options(dict(resources))
    need = {"GPU": opts["num_gpus"], "CPU": opts["num_cpus"], **opts.get("resources", {})}
    if opts.get("memory"):
        need["memory"] = opts["memory"]
    return [n for n in ray.nodes() if n.get("Alive")
            and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v)]


def lost_errors(ray) -> tuple[type, ...]:
    """Ray's exceptions that mean a worker, a node or an object went away (retryable)."""
    ex = ray.exceptions
    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "RaySystemError",
             "LocalRayletDiedError", "ObjectFetchTimedOutError", "TaskUnschedulableError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))
