"""The training runner: the doit action that turns a training job into ``raw.safetensors``.

One training, start to finish (:func:`run_training`):

1. take the variant's own lock (``<variant_dir>/.train.lock``: one training per
   variant folder at a time), delete temp folders left by a killed run and the
   old signature sidecar ``raw.json`` (the old ``raw.safetensors``, if any, stays
   but is stale without it);
2. take a GPU lock (:mod:`charbuild.train.gpulock`), waiting while all are busy;
3. compute the input signature (files and ``signature_extra``) *now*, before the
   trainer reads anything: an input edited while the training runs makes the
   result stale, never wrongly fresh;
4. make a temp folder ``<variant_dir>/.train-XXXX``, write the job there as
   ``job.json`` with ``output`` pointing into it, start the backend in its own
   process group/session with ``CUDA_VISIBLE_DEVICES`` set, and relay its output
   byte for byte (``\\r`` progress bars intact) to ``<variant_dir>/train.log`` and
   the console;
5. on success move the result onto ``job["output"]`` with ``os.replace`` and then
   write the sidecar atomically; on a non-zero exit raise TrainingError with the
   log's last lines;
6. on KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the dodo) or any
   error: SIGTERM the trainer's process group, wait a few seconds, SIGKILL it,
   delete the temp folder, release the locks, re-raise.

So a stopped training never leaves a raw file, and a raw file always has the
signature of the inputs it was trained from. If the runner itself is SIGKILLed,
the trainer (in its own session) is orphaned: its next write to the closed
output pipe fails and it exits, and until then it still holds the GPU and
variant locks, whose descriptors it inherited (POSIX). Its partial output stays
in the temp folder, removed by the next run.

Backends: ``builtin`` runs ``python -m charbuild.train.builtin job.json``, ``fake``
``python -m charbuild.train.fake job.json`` (both with this interpreter), and
``sd-scripts`` the command of :func:`charbuild.train.sdscripts.build_command`.
All run with ``cwd = project_root`` and write ``<temp>/<output_name>.safetensors``.

Optional ``job["trainer"]`` keys read here: ``kill_grace`` (seconds between SIGTERM
and SIGKILL, default 5), ``lock_poll`` (seconds between GPU lock tries, default 1),
``lock_dir`` (default ``<root>/build/locks``), ``gpus`` (default ``[0]``); the fake
backend reads ``fake_seconds``, ``fake_fail``, ``fake_record``, ``fake_grandchild``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from doit.exceptions import TaskFailed
from filelock import FileLock, Timeout

from ..errors import TrainingError, doit_action
from ..fsutil import atomic_path, replace_file, write_text_atomic
from ..signature import canonical_json, compute_signature, describe_difference, read_sidecar, write_sidecar
from . import BACKENDS
from .gpulock import gpu_lease, lock_fd
from .sdscripts import build_command
from .variants import output_name

#: Seconds a stopped trainer gets between SIGTERM and SIGKILL (``trainer.kill_grace`` overrides).
KILL_GRACE = 5.0
#: Lines of the log quoted in a TrainingError.
TAIL_LINES = 20
TEMP_PREFIX = ".train-"
LOG_NAME = "train.log"


# ---------------------------------------------------------------------------- paths


def sidecar_path(job: Mapping[str, Any]) -> Path:
    """The signature sidecar beside the raw LoRA: ``raw.safetensors`` -> ``raw.json``."""
    return Path(job["output"]).with_suffix(".json")


def log_path(job: Mapping[str, Any]) -> Path:
    """``<variant_dir>/train.log``: the trainer's whole output of the latest run."""
    return Path(job["variant_dir"]) / LOG_NAME


def _effective_job(job: Mapping[str, Any]) -> dict:
    """A deep copy of ``job`` as the backend sees it: params' ``clip_skip`` filled from the model."""
    eff = json.loads(json.dumps(job))
    params = eff["params"]
    if params.get("clip_skip") is None:
        params["clip_skip"] = eff.get("model", {}).get("clip_skip") or 2
    eff.setdefault("trainer", {})
    return eff


def _backend_job(job: dict, temp_dir: Path) -> dict:
    out = temp_dir / f"{output_name(job['lora'], job['params'])}.safetensors"
    return dict(job, output=str(out))


def backend_command(job: Mapping[str, Any], job_file: str | Path) -> list[str]:
    """The argument list that runs ``job``'s backend (``job["output"]`` already redirected)."""
    backend = job["trainer"].get("backend", "builtin")
    if backend == "builtin":
        return [sys.executable, "-m", "charbuild.train.builtin", str(job_file)]
    if backend == "fake":
        return [sys.executable, "-m", "charbuild.train.fake", str(job_file)]
    if backend == "sd-scripts":
        return build_command(job)
    raise TrainingError(f"unknown trainer backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _command_line(cmd: list[str]) -> str:
    return subprocess.list2cmdline(cmd) if os.name == "nt" else shlex.join(cmd)


def dry_run_commands(job: Mapping[str, Any]) -> list[str]:
    """Human-readable lines saying what :func:`run_training` would run for ``job``.

    A comment line (backend, working directory, GPUs) and the command line; the
    temp folder is shown as ``<variant_dir>/.train-XXXXXXXX``.
    """
    eff = _effective_job(job)
    temp = Path(eff["variant_dir"]) / f"{TEMP_PREFIX}XXXXXXXX"
    bjob = _backend_job(eff, temp)
    cmd = backend_command(bjob, temp / "job.json")
    trainer = eff["trainer"]
    gpus = ", ".join(str(g) for g in trainer.get("gpus", [0]))
    return [
        f"# {eff['lora']}/{eff['variant']}: backend {trainer.get('backend', 'builtin')}, "
        f"cwd {eff['project_root']}, CUDA_VISIBLE_DEVICES = first free of [{gpus}]",
        _command_line(cmd),
    ]


# ---------------------------------------------------------------------------- freshness


class Freshness(NamedTuple):
    """``(fresh, reason)``; its truth value is ``fresh`` (safe to use as a doit ``uptodate`` result)."""

    fresh: bool
    reason: str

    def __bool__(self) -> bool:
        return bool(self.fresh)


def is_up_to_date(job: Mapping[str, Any]) -> Freshness:
    """Whether ``job["output"]`` was trained from the inputs and settings now on disk, and why not.

    Compares the sidecar written at the start of the finished training with the
    current inputs (size+mtime fast path, MD5 otherwise: a touched file is no
    change) and ``signature_extra``.
    """
    if not Path(job["output"]).is_file():
        return Freshness(False, "not trained yet")
    reason = describe_difference(
        read_sidecar(sidecar_path(job)), job["inputs"], job["project_root"], job["signature_extra"]
    )
    return Freshness(reason is None, reason or "up to date")


# ---------------------------------------------------------------------------- process handling


def _console_writer(echo: bool) -> Callable[[bytes], None] | None:
    if not echo:
        return None
    stream = sys.stdout
    buffer = getattr(stream, "buffer", None)

    def write(data: bytes) -> None:
        try:
            if buffer is not None:
                stream.flush()
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode("utf-8", "replace"))
                stream.flush()
        except (OSError, ValueError):
            pass

    return write


def _say(message: str, log_fh=None, echo: bool = True) -> None:
    line = f"charbuild: {message}\n"
    if log_fh is not None:
        log_fh.write(line.encode("utf-8"))
        log_fh.flush()
    if echo:
        print(line, end="", flush=True)


def _relay(pipe, log_fh, console) -> None:
    """Copy the trainer's output to the log and the console as it comes, until EOF."""
    read = getattr(pipe, "read1", pipe.read)
    while True:
        try:
            chunk = read(65536)
        except (OSError, ValueError):
            break
        if not chunk:
            break
        try:
            log_fh.write(chunk)
            log_fh.flush()
        except (OSError, ValueError):  # log closed or disk full: keep draining the pipe
            pass
        if console is not None:
            console(chunk)


def _popen(cmd: list[str], cwd: str, env: dict, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    kwargs: dict[str, Any] = dict(
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
        kwargs["pass_fds"] = pass_fds
    try:
        return subprocess.Popen(cmd, **kwargs)
    except OSError as e:
        raise TrainingError(f"cannot start the trainer {cmd[0]!r}: {e.strerror or e}") from None


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()
    if os.name == "nt":
        return proc.returncode is None
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _linux_group_has_live_member(proc.pid)


def _linux_group_has_live_member(pgid: int) -> bool:
    """On Linux, whether group ``pgid`` has a member that is not a zombie (True elsewhere).

    An orphaned zombie stays in its group until its new parent reaps it, and in a
    container nobody may: without this, every stop would wait the whole grace period.
    """
    proc_dir = Path("/proc")
    if not (proc_dir / "self" / "stat").exists():
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if os.name == "nt":
        if sig == signal.SIGTERM:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
            with contextlib.suppress(OSError):
                proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_process_group(proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
    """Stop ``proc`` and every process of its group: SIGTERM, ``grace`` seconds, SIGKILL.

    A second Ctrl-C while waiting goes straight to SIGKILL. Reaps ``proc``.
    """
    try:
        if _group_alive(proc):
            _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc):
                time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        if _group_alive(proc):
            _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _run_process(cmd, *, cwd, env, pass_fds, log_fh, console, grace) -> int:
    """Run ``cmd`` in its own process group, relaying output; stop the group on any exception."""
    proc = _popen(cmd, cwd, env, pass_fds)
    relay = threading.Thread(target=_relay, args=(proc.stdout, log_fh, console), daemon=True)
    relay.start()
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        relay.join(timeout=10)
        if relay.is_alive():  # something the trainer started still holds the pipe open
            stop_process_group(proc, grace)
            relay.join(timeout=5)
        elif _group_alive(proc):  # leftovers (e.g. data loader workers): they must not outlive it
            stop_process_group(proc, grace)
        return rc
    except BaseException:
        stop_process_group(proc, grace)
        raise
    finally:
        relay.join(timeout=5)
        with contextlib.suppress(Exception):
            proc.stdout.close()


def log_tail(path: str | Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log, ``\\r`` progress redraws reduced to their final state."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        if parts:
            out.append(parts[-1].rstrip())
    return out[-lines:]


@contextlib.contextmanager
def _variant_lock(variant_dir: Path, echo: bool) -> Iterator[int | None]:
    lock = FileLock(variant_dir / ".train.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting: another process is training {variant_dir}", echo=echo)
        lock.acquire()
    try:
        yield lock_fd(lock)
    finally:
        lock.release()


def _remove_stale_temps(variant_dir: Path) -> None:
    for p in variant_dir.glob(f"{TEMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _child_env(job: Mapping[str, Any], gpu) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env["PYTHONUNBUFFERED"] = "1"
    if job["trainer"].get("backend", "builtin") in ("builtin", "fake"):
        pkg_parent = str(Path(__file__).resolve().parents[2])
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + old if old else "")
    return env


# ---------------------------------------------------------------------------- the action


def run_training(job: Mapping[str, Any], *, echo: bool = True) -> None:
    """Train ``job`` (see docs/architecture.md, "The training job") into ``job["output"]``.

    Raises TrainingError when the trainer fails (message: exit status, the log's
    last lines and its path); re-raises KeyboardInterrupt and other exceptions
    after stopping the trainer's process group and deleting its partial output.
    ``echo=False`` keeps the trainer's output out of the console (the log still has it).
    """
    job = _effective_job(job)
    trainer = job["trainer"]
    root = Path(job["project_root"])
    variant_dir = Path(job["variant_dir"])
    output = Path(job["output"])
    label = f"{job['lora']}/{job['variant']}"
    grace = float(trainer.get("kill_grace", KILL_GRACE))
    lock_dir = Path(trainer.get("lock_dir") or root / "build" / "locks")
    gpus = trainer.get("gpus") or [0]
    variant_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)

    with _variant_lock(variant_dir, echo) as variant_fd:
        _remove_stale_temps(variant_dir)
        sidecar_path(job).unlink(missing_ok=True)
        restored, first_signature = _restore_from_run_cache(job, root, output, label, echo)
        if restored:
            return
        poll = float(trainer.get("lock_poll", 1.0))
        say = lambda m: _say(m.removeprefix("charbuild: "), echo=echo)  # noqa: E731
        with gpu_lease(lock_dir, gpus, poll=poll, on_wait=say) as lease:
            try:
                # again now that the GPU is ours: edits made while waiting count (unchanged files keep their MD5)
                signature = compute_signature(job["inputs"], root, job["signature_extra"], known=first_signature)
            except OSError as e:
                raise TrainingError(f"cannot read a training input: {e.strerror or e}", path=e.filename) from None
            temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=variant_dir))
            try:
                bjob = _backend_job(job, temp)
                job_file = temp / "job.json"
                write_text_atomic(job_file, json.dumps(bjob, indent=1, ensure_ascii=False) + "\n")
                cmd = backend_command(bjob, job_file)
                fds = tuple(fd for fd in (lease.lock_fd, variant_fd) if fd is not None)
                log = log_path(job)
                with open(log, "wb") as log_fh:
                    _say(
                        f"training {label} on GPU {lease.gpu} ({trainer.get('backend', 'builtin')})",
                        log_fh,
                        echo,
                    )
                    log_fh.write(f"# cwd: {root}\n# command: {_command_line(cmd)}\n".encode("utf-8"))
                    log_fh.flush()
                    rc = _run_process(
                        cmd,
                        cwd=str(root),
                        env=_child_env(job, lease.gpu),
                        pass_fds=fds,
                        log_fh=log_fh,
                        console=_console_writer(echo),
                        grace=grace,
                    )
                raw = Path(bjob["output"])
                if rc != 0:
                    tail = "\n".join("    " + line for line in log_tail(log))
                    raise TrainingError(
                        f"training {label} failed (exit status {rc}); last lines of {log}:\n{tail}", path=log
                    )
                if not raw.is_file():
                    raise TrainingError(
                        f"training {label} finished but wrote no {raw.name}; see {log}", path=log
                    )
                replace_file(raw, output)
                write_sidecar(sidecar_path(job), signature)
                _store_in_run_cache(job, root, output, signature)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
    _say(f"trained {label} -> {output}", echo=echo)


def run_cache_key(signature: Mapping[str, Any]) -> str:
    """The identity of a training: its settings and the *content* of its inputs.

    File times and the project's location are left out, so reverting a setting or
    moving the project finds the earlier result.
    """
    content = {"extra": signature["extra"], "files": {k: v[2] for k, v in signature["files"].items()}}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()[:32]


def run_cache_dir(root: Path) -> Path:
    """Where finished trainings are kept by :func:`run_cache_key` (safe to delete at any time)."""
    return root / "build" / "cache" / "trained"


def _restore_from_run_cache(job: Mapping[str, Any], root: Path, output: Path, label: str, echo: bool):
    """Put a LoRA trained earlier from identical inputs and settings in place, instead of training.

    Returns (whether it did, the inputs' signature or None).
    """
    if not job["trainer"].get("run_cache", True):
        return False, None
    try:
        signature = compute_signature(job["inputs"], root, job["signature_extra"])
    except OSError:
        return False, None
    cached = run_cache_dir(root) / f"{run_cache_key(signature)}.safetensors"
    if not cached.is_file():
        return False, signature
    with atomic_path(output) as tmp:
        shutil.copyfile(cached, tmp)
    write_sidecar(sidecar_path(job), signature)
    _say(f"restored {label} from the run cache (same inputs and settings as an earlier training): {cached.name}", echo=echo)
    return True, signature


def _store_in_run_cache(job: Mapping[str, Any], root: Path, output: Path, signature: Mapping[str, Any]) -> None:
    if not job["trainer"].get("run_cache", True):
        return
    cached = run_cache_dir(root) / f"{run_cache_key(signature)}.safetensors"
    if cached.exists():
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(output, cached)  # no extra disk space where the file system allows it
    except OSError:
        with atomic_path(cached) as tmp:
            shutil.copyfile(output, tmp)


@doit_action
def train_action(job: Mapping[str, Any]) -> bool | TaskFailed:
    """The doit python-action: :func:`run_training`, a TrainingError (or any error of ours, such
    as an output held open elsewhere) returned as TaskFailed.

    KeyboardInterrupt propagates (doit records finished tasks and exits 130).
    """
    run_training(job)
    return True
