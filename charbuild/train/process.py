"""Running a trainer process: its own process group, output relayed, stopped as a whole.

:func:`run_process` starts a command in a new session (POSIX) or process group (Windows),
copies its output byte for byte (``\\r`` progress bars intact) to a log file and the
console, and on any exception (Ctrl-C included) stops the whole group: SIGTERM, a grace
period, SIGKILL (:func:`stop_process_group`). Nothing here knows about training jobs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import TrainingError
from .hardware import slot_env

#: Seconds a stopped process group gets between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
#: Lines of the log quoted in a TrainingError.
TAIL_LINES = 20


def command_line(cmd: list[str]) -> str:
    """``cmd`` as one line a user can paste into this platform's shell."""
    return subprocess.list2cmdline(cmd) if os.name == "nt" else shlex.join(cmd)


def child_env(gpu: int | str, cpu_trainings: int = 1) -> dict[str, str]:
    """The environment of a trainer on ``gpu`` (a GPU number or a CPU slot,
    :func:`charbuild.train.hardware.slot_env`): this process's, with ``CUDA_VISIBLE_DEVICES``."""
    env = dict(os.environ)
    env.update(slot_env(gpu, cpu_trainings))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def say(message: str, log_fh=None, echo: bool = True) -> None:
    """``charbuild: <message>`` to the log (when given) and the console (when ``echo``)."""
    line = f"charbuild: {message}\n"
    if log_fh is not None:
        log_fh.write(line.encode("utf-8"))
        log_fh.flush()
    if echo:
        print(line, end="", flush=True)


def console_writer(echo: bool) -> Callable[[bytes], None] | None:
    """A function writing trainer bytes to stdout as they come (None when ``echo`` is off)."""
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


def relay_output(pipe, log_fh, console) -> None:
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


def own_group_kwargs(detached: bool = False) -> dict[str, Any]:
    """``Popen`` arguments for a child in a new session (POSIX) or process group (Windows), so
    the console's Ctrl-C and a signal to our group do not reach it; ``detached``: on Windows
    also without a console (a background process that outlives its starter)."""
    if os.name != "nt":
        return {"start_new_session": True}
    flags = subprocess.CREATE_NEW_PROCESS_GROUP | (subprocess.DETACHED_PROCESS if detached else 0)
    return {"creationflags": flags}


def start_in_own_group(cmd: list[str], cwd: str, env: dict, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """Start ``cmd`` in a new session (POSIX) or process group (Windows), output on one pipe."""
    kwargs: dict[str, Any] = dict(
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        **own_group_kwargs(),
    )
    if os.name != "nt":
        kwargs["pass_fds"] = pass_fds
    try:
        return subprocess.Popen(cmd, **kwargs)
    except OSError as e:
        raise TrainingError(f"cannot start the trainer {cmd[0]!r}: {e.strerror or e}") from None


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` or any live member of its process group still runs."""
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
        if group_alive(proc):
            _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and group_alive(proc):
                time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        if group_alive(proc):
            _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def run_process(cmd, *, cwd, env, pass_fds=(), log_fh, console=None, grace: float = KILL_GRACE) -> int:
    """Run ``cmd`` in its own process group, relaying output; stop the group on any exception."""
    proc = start_in_own_group(cmd, cwd, env, pass_fds)
    relay = threading.Thread(target=relay_output, args=(proc.stdout, log_fh, console), daemon=True)
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
        elif group_alive(proc):  # leftovers (e.g. data loader workers): they must not outlive it
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
