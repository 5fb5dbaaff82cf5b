"""The worker side of a cluster training: one Ray task that is a streaming generator.

:func:`train_on_worker` receives a :mod:`~charbuild.train.executors.payload` (the job,
its input files as object-store references keyed by MD5, the model as references
keyed by its hash), lays out a temporary copy of the project, starts the backend
exactly as the local launcher does (:mod:`charbuild.train.process`: its own process
group, ``CUDA_VISIBLE_DEVICES`` from Ray), and yields messages as it goes:

``{"kind": "start", ...}``  where it runs (node ip, node id, host, worker pid, GPUs);
``{"kind": "log", "data": bytes}``  the trainer's output, in order, as it comes;
``{"kind": "done", "rc": int, "lora": bytes | None, "observed": {relpath: bytes}, "moved": {...}}``  the end
(``observed``: ``metrics.jsonl`` and ``samples/…`` beside the LoRA).

A base model received once is kept in the node's cache folder under its hash, so
later trainings on that node move only their own inputs. Runs only inside a Ray
worker (it calls ``ray.get``); the module imports no Ray at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ...fsutil import write_text_atomic
from ...layout import LOG_NAME
from ..backends import collect_outputs, get_backend, prepare_files
from ..job import TrainJob
from ..process import child_env, group_alive, relay_output, start_in_own_group, stop_process_group
from .payload import job_for_worker

#: Seconds between two log messages: chunks that arrive meanwhile travel together.
LOG_BATCH_SECONDS = 0.2
MODEL_CACHE_NAME = "charbuild-models"
#: A worker's temporary project copy, and the lock file it holds in it while it trains there.
COPY_PREFIX = "charbuild-ray-"
IN_USE = ".in-use.lock"
#: Seconds a copy must exist before an unlocked one counts as abandoned.
ABANDONED_AFTER = 10.0
_COMPLETE = ".complete"


def worker_cache_dir(setting: str | None) -> Path:
    """The node's folder for received models: ``trainer.worker_cache`` or ``<temp>/charbuild-models``."""
    return Path(setting).expanduser() if setting else Path(tempfile.gettempdir()) / MODEL_CACHE_NAME


def _fetch(refs: list) -> list[bytes]:
    import ray

    return ray.get(refs) if refs else []


def ensure_model(cache: Path, model: Mapping[str, Any]) -> tuple[Path, int]:
    """The local path of a travelling model, fetched into ``cache/<hash>/`` unless already there.

    Returns (path, bytes fetched now). A file lock per hash makes concurrent trainings on
    one node fetch it once; the folder is complete only once renamed into place.
    """
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    final = cache / model["hash"]
    target = final / model["name"]
    if (final / _COMPLETE).is_file():
        return target, 0
    with FileLock(str(cache / f"{model['hash']}.lock")):
        if (final / _COMPLETE).is_file():
            return target, 0
        tmp = Path(tempfile.mkdtemp(prefix=f".{model['hash']}-", dir=cache))
        moved = 0
        try:
            rels = sorted(model["files"])
            for rel, data in zip(rels, _fetch([model["files"][r] for r in rels])):
                dest = tmp / model["name"] / rel if model["is_dir"] else tmp / model["name"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)  # bytes or a uint8 array (a view of the object store)
                moved += len(data)
            (tmp / _COMPLETE).write_text(json.dumps({"name": model["name"], "bytes": moved}), encoding="utf-8")
            if final.exists():  # a half-made folder of a killed fetch (no marker)
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, moved


def lay_out_project(root: Path, files: Mapping[str, Any], inline: Mapping[str, bytes]) -> int:
    """Write the travelling files under ``root`` at their project-relative paths; return the bytes fetched.

    ``files``: ``{rel: (md5, ref)}`` in the object store; ``inline``: ``{rel: bytes}``.
    """
    rels = sorted(files)
    moved = 0
    for rel, data in zip(rels, _fetch([files[r][1] for r in rels])):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        moved += len(data)
    for rel, data in inline.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        moved += len(data)
    return moved


def remove_abandoned_copies(parent: Path | None = None) -> None:
    """Delete project copies of killed workers on this node (the kernel freed their lock).

    Ray may end a killed worker's children with it, the watchdog included, so the next
    training on the node cleans up instead.
    """
    from filelock import FileLock, Timeout

    for copy in Path(parent or tempfile.gettempdir()).glob(f"{COPY_PREFIX}*"):
        marker = copy / IN_USE
        try:
            if time.time() - marker.stat().st_mtime < ABANDONED_AFTER:
                continue  # being created right now: its worker may not hold the lock yet
        except OSError:
            continue  # no marker: not a copy of ours
        lock = FileLock(str(marker))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a live worker trains there
        try:
            shutil.rmtree(copy, ignore_errors=True)
        finally:
            lock.release()


def _where() -> dict[str, Any]:
    import socket

    import ray

    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    return {"kind": "start", "node_ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
            "host": socket.gethostname(), "pid": os.getpid(), "gpus": gpus}


def _start_watchdog(pgid: int, grace: float, leftover: str):
    if os.name != "posix":
        return None
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "charbuild.train.executors.watchdog", str(os.getpid()), str(pgid), str(grace),
         leftover],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[3]),
                                                                    os.environ.get("PYTHONPATH")) if p)),
    )


def train_on_worker(payload: Mapping[str, Any]) -> Iterator[dict]:
    """The Ray task (a streaming generator): lay out the inputs, train, yield log and result."""
    from filelock import FileLock

    start = _where()
    yield start
    remove_abandoned_copies()
    root = Path(tempfile.mkdtemp(prefix=COPY_PREFIX))
    in_use = FileLock(str(root / IN_USE))
    in_use.acquire()
    try:
        moved_inputs = lay_out_project(root, payload["files"], payload["inline"])
        model_paths: dict[str, str] = {}
        moved_model = 0
        cache = worker_cache_dir(payload["worker_cache"])
        for key, model in payload["models"].items():
            path, n = ensure_model(cache, model)
            model_paths[key] = str(path)
            moved_model += n
        # the job's output lies in the driver's temp folder: re-rooted, it is one in the copy
        wjob = job_for_worker(TrainJob.from_dict(payload["job"]), root, model_paths)
        temp = Path(wjob.output).parent
        temp.mkdir(parents=True, exist_ok=True)
        job_file = temp / "job.json"
        write_text_atomic(job_file, wjob.to_json())
        backend = get_backend(wjob.backend)
        prepare_files(backend, wjob)  # the files its command names, here where it runs
        cmd = backend.command(wjob, job_file)
        gpu = ",".join(start["gpus"]) if start["gpus"] else os.environ.get("CUDA_VISIBLE_DEVICES", "")
        env = backend.env(wjob, child_env(gpu))
        env.update(payload.get("env") or {})
        result = yield from _run_streaming(cmd, wjob.project_root, env, temp / LOG_NAME, wjob.trainer.kill_grace,
                                           Path(wjob.output), {"inputs": moved_inputs, "model": moved_model},
                                           before_collect=lambda: collect_outputs(backend, wjob))
    finally:
        in_use.release()
        shutil.rmtree(root, ignore_errors=True)
    # last, after the cleanup: the driver may exit (and Ray end this worker) once it has the result
    yield result


def train_into_queue(payload: Mapping[str, Any], queue) -> None:
    """:func:`train_on_worker` for a Ray Client driver, which cannot read a streaming generator:
    each message goes into ``queue`` (a ``ray.util.queue.Queue``) instead, in the same order."""
    for msg in train_on_worker(payload):
        queue.put(msg)


def _run_streaming(cmd, root: str, env: dict, log: Path, grace: float, raw: Path, moved: dict, before_collect=None):
    """Run ``cmd`` in its own process group (:mod:`charbuild.train.process`), yielding its output in batches;
    return the ``done`` message (exit status, the LoRA's bytes, what it observed). ``before_collect``:
    called after a successful run, before the observed files are read (the backend's ``collect_outputs``)."""
    chunks: queue.Queue[bytes] = queue.Queue()
    proc = start_in_own_group(cmd, str(root), env, ())
    watchdog = _start_watchdog(proc.pid, grace, str(root))
    try:
        with open(log, "wb") as log_fh:
            relay = threading.Thread(target=relay_output, args=(proc.stdout, log_fh, chunks.put), daemon=True)
            relay.start()
            while True:
                finished = proc.poll() is not None and not relay.is_alive()
                batch = _drain(chunks, LOG_BATCH_SECONDS if not finished else 0)
                if batch:
                    yield {"kind": "log", "data": batch}
                if finished and chunks.empty():
                    break
                if proc.poll() is not None:
                    relay.join(timeout=10)
                    if relay.is_alive():  # a leftover of the trainer holds the pipe: stop the group
                        stop_process_group(proc, grace)
                        relay.join(timeout=5)
        if group_alive(proc):
            stop_process_group(proc, grace)
        rc = proc.returncode
        data = raw.read_bytes() if rc == 0 and raw.is_file() else None
        if data is not None and before_collect is not None:
            before_collect()
        return {"kind": "done", "rc": rc, "lora": data, "observed": _observed_files(raw.parent) if data else {},
                "moved": moved}
    except BaseException:  # cancelled (KeyboardInterrupt / TaskCancelledError / GeneratorExit) or failed
        stop_process_group(proc, grace)
        raise
    finally:
        with contextlib.suppress(Exception):
            proc.stdout.close()
        if watchdog is not None:
            with contextlib.suppress(Exception):
                watchdog.kill()
                watchdog.wait(timeout=5)


def _observed_files(folder: Path) -> dict[str, bytes]:
    """What the training showed beside its LoRA (``metrics.jsonl``, ``samples/…``), by POSIX path
    relative to ``folder``: it travels back with the LoRA, as a local training leaves it."""
    from ..observed import OBSERVED_NAMES

    out = {}
    for name in OBSERVED_NAMES:
        path = folder / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            out[f.relative_to(folder).as_posix()] = f.read_bytes()
    return out


def _drain(chunks: queue.Queue, wait: float) -> bytes:
    parts = []
    deadline = time.monotonic() + wait
    while True:
        timeout = deadline - time.monotonic()
        try:
            parts.append(chunks.get(timeout=timeout) if timeout > 0 else chunks.get_nowait())
        except queue.Empty:
            break
    return b"".join(parts)
