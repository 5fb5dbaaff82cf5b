"""The Ray executor, driver side: one stale training = one Ray task on some worker.

:func:`launch_on_ray` is the launcher the runner calls for ``executor = "ray"``
(:class:`~charbuild.train.runner.Launch`). Everything around it stays the runner's and
local: the variant lock, the stale-temp cleanup, the run-cache check, the input signature
taken before the training starts, and afterwards the move of the raw file into place, its
signature sidecar and the run-cache entry, so ``charbuild status`` and the incremental
contract are the local ones. No GPU lock of this machine is taken (the launcher has
``local_gpu = False``): Ray's GPU scheduling replaces it.

The launcher ships the job and its inputs (:mod:`.payload`), submits
:func:`.worker.train_on_worker` with the configured resources, streams the trainer's
output into ``train.log`` and the console, and leaves the LoRA that comes back at the
job's ``output`` (in the runner's temp folder).

Failures: a worker or node lost mid-training is retried ``trainer.retries`` times,
then fails the target naming the node and the log's last lines; a trainer that exits
non-zero fails at once (its exit status goes back to the runner, the log names the node).
KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the dodo) cancels the remote task
with ``ray.cancel(force=True)`` — the worker's watchdog then stops the trainer's process
group — and nothing is written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ...errors import TrainingError
from ...fsutil import atomic_path, write_text_atomic
from ...layout import Layout
from ..job import TrainJob
from ..process import log_tail, say
from .payload import build_payload, input_bytes
from .settings import INSTALL_HINT, ray_task_options

if TYPE_CHECKING:
    from ..runner import Launch

ADDRESS_FILE = "ray-address"
_remote_fn = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TrainingError(f"trainer.executor = \"ray\" needs Ray: run `{INSTALL_HINT}`") from None
    return ray


def connect(address: str | None, lock_dir: Path, gpus: int = 1) -> None:
    """Connect this process to Ray once: to ``address``, or to the local instance of this build.

    Without an address the first process of a build starts a local instance (``gpus``
    logical GPUs) and leaves its address in ``lock_dir``; the other ``doit -n``
    processes join it, so they share one scheduler instead of each owning every GPU.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return
    with _keep_sigterm_handler():
        _init(ray, address, lock_dir, gpus)


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


def _init(ray, address: str | None, lock_dir: Path, gpus: int) -> None:
    common = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
    try:
        if address is not None:
            ray.init(address=address, **common)
            return
        from filelock import FileLock

        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / "ray-start.lock")):
            known = lock_dir / ADDRESS_FILE
            owner, _, addr = (known.read_text(encoding="utf-8").strip() if known.is_file() else "").partition(" ")
            if addr and _pid_alive(owner):  # the instance lives as long as the process that started it
                with contextlib.suppress(Exception):
                    ray.init(address=addr, **common)
                    return
            ray.init(num_gpus=gpus, include_dashboard=False, **common)
            write_text_atomic(known, f"{os.getpid()} {ray.get_runtime_context().gcs_address}\n")
    except ConnectionError as e:
        raise TrainingError(f"cannot reach the Ray cluster at {address!r}: {e}; start one (`ray start --head`) "
                            "or fix trainer.ray_address") from None


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if os.name == "nt":  # os.kill would terminate it there; just try the address
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remote():
    global _remote_fn
    if _remote_fn is None:
        ray = _import_ray()
        from .worker import train_on_worker

        _remote_fn = ray.remote(train_on_worker)
    return _remote_fn


def fitting_nodes(resources: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The live nodes of the connected cluster whose total resources can hold one training."""
    ray = _import_ray()
    opts = ray_task_options(dict(resources))
    need = {"GPU": opts["num_gpus"], "CPU": opts["num_cpus"], **opts.get("resources", {})}
    if opts.get("memory"):
        need["memory"] = opts["memory"]
    return [n for n in ray.nodes() if n.get("Alive")
            and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v)]


def _lost_errors(ray) -> tuple[type, ...]:
    ex = ray.exceptions
    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "RaySystemError",
             "LocalRayletDiedError", "ObjectFetchTimedOutError", "TaskUnschedulableError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


def launch_on_ray(launch: "Launch") -> int:
    """The ``ray`` launcher: train ``launch.job`` as one Ray task; leave the LoRA at ``launch.job.output``.

    Returns the trainer's exit status (non-zero: the runner fails the target with the log's
    last lines, the node named in them). Raises TrainingError when the worker was lost after
    the retries, or the cluster is unreachable or too small; re-raises KeyboardInterrupt
    after cancelling the task.
    """
    from ..runner import log_path

    ray = _import_ray()
    job, log_fh, console = launch.job, launch.log, launch.console
    echo = console is not None
    t = job.trainer
    connect(t.ray_address, _lock_dir(job), gpus=len(t.gpus))
    if not fitting_nodes(t.resources):
        raise TrainingError(f"training {job.label}: no node of the Ray cluster has the resources one training "
                            f"asks for ({_resources_text(t.resources)}); cluster: {ray.cluster_resources()}; "
                            "change trainer.resources or add a worker")
    payload = build_payload(job)
    own_bytes = input_bytes(payload, job)
    attempts = t.retries + 1
    say(f"on the Ray cluster, asking for {_resources_text(t.resources)}", log_fh, echo)
    for attempt in range(1, attempts + 1):
        if attempt > 1:  # the same log: the lost attempt's lines stay above
            say(f"starting {job.label} again, attempt {attempt}/{attempts}", log_fh, echo)
        try:
            result, where = _stream(ray, payload, job, log_fh, console, echo)
            break
        except _lost_errors(ray) as e:
            reason = _lost_reason(e, getattr(e, "_charbuild_where", None))
            say(reason, log_fh, echo)
            if attempt == attempts:
                log_fh.flush()
                log = log_path(job)
                tail = "\n".join("    " + line for line in log_tail(log))
                raise TrainingError(f"training {job.label}: {reason}"
                                    + (f" (after {attempts - 1} retries)" if attempts > 1 else "")
                                    + f"; last lines of {log}:\n{tail}", path=log) from None
    node = _node_text(where)
    if result["rc"] != 0:
        say(f"the trainer on {node} exited with status {result['rc']}", log_fh, echo)
        return result["rc"]
    if result["lora"] is None:
        say(f"the trainer on {node} finished but sent back no LoRA", log_fh, echo)
        return 0  # the runner reports the missing raw file
    with atomic_path(Path(job.output)) as tmp:
        tmp.write_bytes(result["lora"])
    out_dir = Path(job.output).parent  # the runner's temp folder: it lands these with the LoRA
    for rel, data in result.get("observed", {}).items():
        target = out_dir.joinpath(*rel.split("/"))
        if out_dir.resolve() not in target.resolve().parents:
            raise TrainingError(f"training {job.label}: the worker sent back a file outside its folder: {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    moved = result["moved"]
    say(f"trained on {node}; moved there: {moved['inputs']} bytes of inputs (own inputs: {own_bytes}), "
        f"{moved['model']} bytes of model; {len(result['lora'])} bytes back", log_fh, echo=False)
    return 0


def _lock_dir(job: TrainJob) -> Path:
    return Path(job.trainer.lock_dir) if job.trainer.lock_dir else Layout(job.project_root).locks_dir


def _stream(ray, payload, job: TrainJob, log_fh, console, echo):
    """Submit the task and consume its messages until ``done``; cancel it on any interruption."""
    opts = ray_task_options(job.trainer.resources)
    gen = _remote().options(num_returns="streaming", max_retries=0, retry_exceptions=False,
                            name=f"charbuild train {job.label}", **opts).remote(payload)
    where: dict[str, Any] | None = None
    at_line_start = True
    try:
        for ref in gen:
            msg = ray.get(ref)
            kind = msg["kind"]
            if kind == "start":
                where = msg
                say(f"running on {_node_text(where)}, GPU {','.join(where['gpus']) or 'none'}", log_fh, echo)
            elif kind == "log":
                at_line_start = msg["data"].endswith(b"\n")
                log_fh.write(msg["data"])
                log_fh.flush()
                if console is not None:
                    console(msg["data"])
            elif kind == "done":
                return msg, where
        raise TrainingError(f"training {job.label}: the worker on {_node_text(where)} ended without a result")
    except _lost_errors(ray) as e:
        e._charbuild_where = where
        if not at_line_start:  # the message that follows starts on its own line
            log_fh.write(b"\n")
        raise
    except ray.exceptions.RayTaskError as e:  # an error in our worker code, e.g. the trainer cannot start
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
        raise TrainingError(f"training {job.label} failed on {_node_text(where)}: {cause}") from None
    except BaseException:
        with contextlib.suppress(Exception):
            ray.cancel(gen, force=True)
        raise


def _lost_reason(error: BaseException, where) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the worker on {_node_text(where)} was lost mid-training ({type(error).__name__}: {first})"


def _node_text(where) -> str:
    if not where:
        return "an unknown node (the task had not started)"
    return f"node {where['node_ip']} ({where['host']}, worker pid {where['pid']})"


def _resources_text(resources: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in resources.items())


def dry_run_lines(job: TrainJob) -> list[str]:
    """Where the Ray executor would run ``job``: the resources asked and the nodes that fit."""
    t = job.trainer
    head = f"# executor ray: one Ray task asking for {_resources_text(t.resources)}"
    if t.ray_address is None:
        return [head + f" on a local Ray instance started for the build ({len(t.gpus)} logical GPU(s))"]
    try:
        connect(t.ray_address, _lock_dir(job))
        nodes = fitting_nodes(t.resources)
    except TrainingError as e:
        return [head + f" at {t.ray_address}; cluster not reachable now: {e.message}"]
    if not nodes:
        return [head + f" at {t.ray_address}: no node fits: it would fail"]
    names = ", ".join(f"{n['NodeManagerAddress']} (GPU {n['Resources'].get('GPU', 0):g})" for n in nodes)
    return [head + f" at {t.ray_address}; Ray picks one of: {names}"]
