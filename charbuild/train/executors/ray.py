"""The Ray executor, training side: one stale training = one Ray task on some worker.

:func:`launch_on_ray` is the launcher the runner calls for ``executor = "ray"``
(:class:`~charbuild.train.launch.Launch`). Everything around it stays the runner's and
local: the variant lock, the stale-temp cleanup, the run-cache check, the input signature
taken before the training starts, and afterwards the move of the raw file into place, its
signature sidecar and the run-cache entry, so ``charbuild status`` and the incremental
contract are the local ones. No GPU lock of this machine is taken (the launcher has
``local_gpu = False``): Ray's GPU scheduling replaces it.

The launcher hands the job to the build's one Ray driver (:mod:`.driver`, started by the
first training that needs it), which ships the inputs (:mod:`.payload`) and submits
:func:`.worker.train_on_worker` with the configured resources; the launcher streams the
trainer's output it relays into ``train.log`` and the console, and leaves the LoRA that comes
back at the job's ``output`` (in the runner's temp folder). This process imports no Ray.

Failures: a worker or node lost mid-training is retried ``trainer.retries`` times,
then fails the target naming the node and the log's last lines; a trainer that exits
non-zero fails at once (its exit status goes back to the runner, the log names the node).
KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the dodo) closes the connection to
the driver, which cancels the remote task with ``ray.cancel(force=True)`` — the worker's
watchdog then stops the trainer's process group — and nothing is written. So does a doit
process that is killed outright.

The Ray calls themselves (connect, fit, submit) are :mod:`.cluster`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ...errors import TrainingError
from ...fsutil import atomic_path
from ...layout import Layout
from ..job import TrainJob
from ..launch import log_path
from ..process import log_tail, say
from .cluster import connect, fitting_nodes
from .driver import DRIVER_LOG, driver_connection
from .payload import forwarded_env, input_bytes

if TYPE_CHECKING:
    from ..launch import Launch


class WorkerLost(Exception):
    """The worker (or its node) of a training went away mid-training: ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def launch_on_ray(launch: "Launch") -> int:
    """The ``ray`` launcher: train ``launch.job`` as one Ray task; leave the LoRA at ``launch.job.output``.

    Returns the trainer's exit status (non-zero: the runner fails the target with the log's
    last lines, the node named in them). Raises TrainingError when the worker was lost after
    the retries, or the cluster is unreachable or too small; re-raises KeyboardInterrupt
    after cancelling the task.
    """
    job, log_fh, console = launch.job, launch.log, launch.console
    echo = console is not None
    t = job.trainer
    own_bytes = input_bytes(job)
    attempts = t.retries + 1
    say(f"on the Ray cluster, asking for {_resources_text(t.resources)}", log_fh, echo)
    for attempt in range(1, attempts + 1):
        if attempt > 1:  # the same log: the lost attempt's lines stay above
            say(f"starting {job.label} again, attempt {attempt}/{attempts}", log_fh, echo)
        try:
            result, where = _stream(job, log_fh, console)
            break
        except WorkerLost as e:
            say(e.reason, log_fh, echo)
            if attempt == attempts:
                log_fh.flush()
                log = log_path(job)
                tail = "\n".join("    " + line for line in log_tail(log))
                raise TrainingError(f"training {job.label}: {e.reason}"
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


def _stream(job: TrainJob, log_fh, console):
    """Send ``job`` to the build's driver and consume the task's messages until ``done``.

    Leaving early (an exception, KeyboardInterrupt) closes the connection: the driver cancels the task.
    """
    where: dict[str, Any] | None = None
    at_line_start = True
    lock_dir = _lock_dir(job)
    with driver_connection(job, lock_dir) as (conn, driver_pid):
        say(f"through the build's Ray driver (pid {driver_pid}, log {lock_dir / DRIVER_LOG})", log_fh, echo=False)
        conn.send({"op": "train", "job": job.to_dict(), "env": forwarded_env()})
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                when = "mid-training" if where else "before the training started"
                log = lock_dir / DRIVER_LOG
                raise TrainingError(f"training {job.label}: the build's Ray driver stopped {when} (Ray ends a driver "
                                    f"that loses its cluster; see {log})", path=log) from None
            kind = msg["kind"]
            if kind == "start":
                where = msg
                gpus = ",".join(where["gpus"]) or "none"
                say(f"running on {_node_text(where)}, GPU {gpus}", log_fh, console is not None)
            elif kind == "log":
                at_line_start = msg["data"].endswith(b"\n")
                log_fh.write(msg["data"])
                log_fh.flush()
                if console is not None:
                    console(msg["data"])
            elif kind == "done":
                return msg, where
            elif kind == "lost":
                if not at_line_start:  # the message that follows starts on its own line
                    log_fh.write(b"\n")
                raise WorkerLost(_lost_reason(msg["error"], msg["text"], where))
            elif kind == "unfit":
                raise TrainingError(f"training {job.label}: no node of the Ray cluster has the resources one "
                                    f"training asks for ({_resources_text(job.trainer.resources)}); cluster: "
                                    f"{msg['cluster']}; change trainer.resources or add a worker")
            elif kind == "gone":
                raise TrainingError(f"training {job.label}: {msg['text']}")
            elif kind == "error":
                raise TrainingError(f"training {job.label} failed on {_node_text(where)}: {msg['text']}")


def _lost_reason(error: str, first_line: str, where) -> str:
    return f"the worker on {_node_text(where)} was lost mid-training ({error}: {first_line or error})"


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
        connect(t.ray_address)
        nodes = fitting_nodes(t.resources)
    except TrainingError as e:
        return [head + f" at {t.ray_address}; cluster not reachable now: {e.message}"]
    if not nodes:
        return [head + f" at {t.ray_address}: no node fits: it would fail"]
    names = ", ".join(f"{n['NodeManagerAddress']} (GPU {n['Resources'].get('GPU', 0):g})" for n in nodes)
    return [head + f" at {t.ray_address}; Ray picks one of: {names}"]
