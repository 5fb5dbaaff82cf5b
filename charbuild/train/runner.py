"""The training runner: the doit action that turns a training job into ``raw.safetensors``.

One training, start to finish (:func:`run_training`):

1. take the variant's own lock (``<variant_dir>/.train.lock``: one training per
   variant folder at a time), delete temp folders left by a killed run and the
   old signature sidecar ``raw.json`` (the old ``raw.safetensors``, if any, stays
   but is stale without it); restore an identical earlier training from the run
   cache (:mod:`charbuild.train.run_cache`) when there is one;
2. take a GPU lock (:mod:`charbuild.train.gpulock`), waiting while all are busy, unless
   the launcher says it needs none (``local_gpu = False``: a cluster schedules GPUs);
3. compute the input signature (files and ``signature_extra``) *now*, before the
   trainer reads anything: an input edited while the training runs makes the
   result stale, never wrongly fresh;
4. make a temp folder ``<variant_dir>/.train-XXXX``, write the job there as
   ``job.json`` (:meth:`TrainJob.to_json`) with ``output`` pointing into it, and
   hand it to the *launcher* (:func:`launch_local` by default: the backend's
   process in its own process group with ``CUDA_VISIBLE_DEVICES`` set, its output
   relayed byte for byte to ``<variant_dir>/train.log`` and the console);
5. on success move the result onto the job's ``output`` with ``os.replace`` and
   then write the sidecar atomically; on a non-zero exit raise TrainingError with
   the log's last lines;
6. on KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it by the dodo) or any
   error: the launcher stops what it started (:mod:`charbuild.train.process`),
   the temp folder is deleted, the locks released, the exception re-raised.

So a stopped training never leaves a raw file, and a raw file always has the
signature of the inputs it was trained from. If the runner itself is SIGKILLed,
the trainer (in its own session) is orphaned: its next write to the closed
output pipe fails and it exits, and until then it still holds the GPU and
variant locks, whose descriptors it inherited (POSIX). Its partial output stays
in the temp folder, removed by the next run.

Backends come from the registry of :mod:`charbuild.train.backends`; all run with
``cwd = project_root`` and write the job's (redirected) ``output``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from doit.exceptions import TaskFailed
from filelock import FileLock, Timeout

from ..errors import TrainingError, doit_action
from ..fsutil import replace_file, write_text_atomic
from ..layout import Layout
from ..signature import compute_signature, write_sidecar
from . import observed, run_cache
from .hardware import is_cpu_slot, training_slots, where_it_trains
from .backends import check_capabilities, collect_outputs, get_backend, prepare_files
from .executors import RAY
from .freshness import Freshness, is_up_to_date, sidecar_path
from .gpulock import gpu_lease, lock_fd
from .job import TrainJob
from .launch import Launch, Launcher, log_path, takes_local_gpu
from .process import child_env, command_line, console_writer, log_tail, run_process, say, stop_process_group

__all__ = ["Freshness", "Launch", "Launcher", "dry_run_commands", "get_launcher", "is_up_to_date", "launch_local",
           "log_path", "log_tail", "register_launcher", "run_training", "sidecar_path", "stop_process_group",
           "takes_local_gpu", "train_action"]

TEMP_PREFIX = ".train-"


def _backend_job(job: TrainJob, temp_dir: Path) -> TrainJob:
    """``job`` with its raw file going to ``<temp>/<lora>-<variant>.safetensors``."""
    return job.with_output(temp_dir / f"{job.title}.safetensors")


# ---------------------------------------------------------------------------- launching


def launch_local(launch: Launch) -> int:
    """Run the job's backend as a process on this machine (the default launcher)."""
    job = launch.job
    backend = get_backend(job.backend)
    prepare_files(backend, job)
    cmd = backend.command(job, launch.job_file)
    launch.log.write(f"# cwd: {job.project_root}\n# command: {command_line(cmd)}\n".encode("utf-8"))
    launch.log.flush()
    rc = run_process(
        cmd,
        cwd=job.project_root,
        env=backend.env(job, child_env(launch.gpu, job.trainer.cpu_trainings)),
        pass_fds=launch.pass_fds,
        log_fh=launch.log,
        console=launch.console,
        grace=job.trainer.kill_grace,
    )
    if rc == 0 and Path(job.output).is_file():
        collect_outputs(backend, job)
    return rc


_LAUNCHERS: dict[str, Launcher] = {}


def register_launcher(name: str, launcher: Launcher) -> Launcher:
    """Make ``launcher`` the one a job with ``trainer.executor == name`` runs with; returns it."""
    _LAUNCHERS[name] = launcher
    return launcher


def get_launcher(name: str) -> Launcher:
    """The launcher registered as ``name``; TrainingError naming the known ones otherwise."""
    try:
        return _LAUNCHERS[name]
    except KeyError:
        raise TrainingError(f"unknown trainer executor {name!r}: expected one of {', '.join(_LAUNCHERS)}") from None


register_launcher("local", launch_local)
register_launcher(RAY.name, RAY)


def dry_run_commands(job: TrainJob) -> list[str]:
    """Human-readable lines saying what :func:`run_training` would run for ``job``.

    A comment line (backend, working directory, GPUs) and the command line; the
    temp folder is shown as ``<variant_dir>/.train-XXXXXXXX``. A launcher other than the
    local one adds its ``dry_run_lines`` (where it would run the command).
    """
    launcher = get_launcher(job.trainer.executor)
    temp = Path(job.variant_dir) / f"{TEMP_PREFIX}XXXXXXXX"
    cmd = get_backend(job.backend).command(_backend_job(job, temp), temp / "job.json")
    if takes_local_gpu(launcher):
        slots = training_slots(job.trainer.gpus, job.trainer.cpu_trainings)
        if is_cpu_slot(slots[0]):
            where = f"cwd {job.project_root}, on the CPU (no GPU found; {len(slots)} training(s) at once)"
        else:
            gpus = ", ".join(str(g) for g in slots)
            where = f"cwd {job.project_root}, CUDA_VISIBLE_DEVICES = first free of [{gpus}]"
    else:
        where = f"executor {job.trainer.executor}, in a copy of the project on the node it picks"
    lines = [f"# {job.label}: backend {job.backend}, {where}", command_line(cmd)]
    describe = getattr(launcher, "dry_run_lines", None)
    return lines + (list(describe(job)) if describe is not None else [])


# ---------------------------------------------------------------------------- the action


@contextlib.contextmanager
def _variant_lock(variant_dir: Path, echo: bool) -> Iterator[int | None]:
    lock = FileLock(variant_dir / ".train.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting: another process is training {variant_dir}", echo=echo)
        lock.acquire()
    try:
        yield lock_fd(lock)
    finally:
        lock.release()


def _remove_stale_temps(variant_dir: Path) -> None:
    for p in variant_dir.glob(f"{TEMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _signature(job: TrainJob, known=None):
    return compute_signature(list(job.inputs), job.project_root, dict(job.signature_extra), known=known)


def _restore_from_run_cache(job: TrainJob, cache_dir: Path, echo: bool):
    """Put a LoRA trained earlier from identical inputs and settings in place, instead of training.

    Returns (whether it did, the inputs' signature or None).
    """
    if not job.trainer.run_cache:
        return False, None
    try:
        signature = _signature(job)
    except OSError:
        return False, None
    cached = run_cache.restore(cache_dir, signature, Path(job.output))
    if cached is None:
        return False, signature
    write_sidecar(sidecar_path(job), signature)
    with_observed = observed.restore(cached, job.variant_dir)
    say(f"restored {job.label} from the run cache (same inputs and settings as an earlier training): "
        f"{cached.name}" + ("" if with_observed else "; its samples and loss log were not kept (trained before "
                            "the cache kept them): delete the cached file to train again for them"), echo=echo)
    return True, signature


def _launcher_name(launcher: Launcher, job: TrainJob) -> str:
    return getattr(launcher, "name", None) or job.trainer.executor


@contextlib.contextmanager
def _gpu_lease_for(launcher: Launcher, job: TrainJob, lock_dir: Path, echo: bool):
    """A GPU lease of this machine for a launcher that needs one, else None (nothing held)."""
    if not takes_local_gpu(launcher):
        yield None
        return
    on_wait = lambda m: say(m.removeprefix("charbuild: "), echo=echo)  # noqa: E731
    slots = training_slots(job.trainer.gpus, job.trainer.cpu_trainings)
    with gpu_lease(lock_dir, slots, poll=job.trainer.lock_poll, on_wait=on_wait) as lease:
        yield lease


def run_training(job: TrainJob, *, echo: bool = True, launcher: Launcher | None = None) -> None:
    """Train ``job`` (a TrainJob or its dict form) into its ``output``.

    Raises TrainingError when the trainer fails (message: exit status, the log's
    last lines and its path); re-raises KeyboardInterrupt and other exceptions
    after the launcher stopped the trainer and its partial output is deleted.
    ``echo=False`` keeps the trainer's output out of the console (the log still has it).
    ``launcher`` runs the training (see :class:`Launch`); default: the one registered under
    ``job.trainer.executor`` (``"local"``: :func:`launch_local`).
    """
    launcher = launcher or get_launcher(job.trainer.executor)
    backend = get_backend(job.backend)
    check_capabilities(backend, job)
    variant_dir = Path(job.variant_dir)
    output = Path(job.output)
    layout = Layout(job.project_root)
    lock_dir = Path(job.trainer.lock_dir) if job.trainer.lock_dir else layout.locks_dir
    variant_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)

    with _variant_lock(variant_dir, echo) as variant_fd:
        _remove_stale_temps(variant_dir)
        sidecar_path(job).unlink(missing_ok=True)
        restored, first_signature = _restore_from_run_cache(job, layout.run_cache_dir, echo)
        if restored:
            return
        with _gpu_lease_for(launcher, job, lock_dir, echo) as lease:
            try:
                # again now that any wait for a GPU is over: edits made meanwhile count (unchanged files keep their MD5)
                signature = _signature(job, known=first_signature)
            except OSError as e:
                raise TrainingError(f"cannot read a training input: {e.strerror or e}", path=e.filename) from None
            temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=variant_dir))
            try:
                bjob = _backend_job(job, temp)
                job_file = temp / "job.json"
                write_text_atomic(job_file, bjob.to_json())
                gpu = lease.gpu if lease is not None else None
                fds = tuple(fd for fd in (lease.lock_fd if lease else None, variant_fd) if fd is not None)
                log = log_path(job)
                with open(log, "wb") as log_fh:
                    if lease is not None:
                        where = where_it_trains(gpu, job.trainer.cpu_trainings)
                    else:
                        where = f"with executor {_launcher_name(launcher, job)}"
                    say(f"training {job.label} {where} ({job.backend})", log_fh, echo)
                    rc = launcher(Launch(bjob, job_file, gpu, log_fh, console_writer(echo), fds))
                raw = Path(bjob.output)
                if rc != 0:
                    tail = "\n".join("    " + line for line in log_tail(log))
                    raise TrainingError(
                        f"training {job.label} failed (exit status {rc}); last lines of {log}:\n{tail}", path=log
                    )
                if not raw.is_file():
                    raise TrainingError(f"training {job.label} finished but wrote no {raw.name}; see {log}", path=log)
                replace_file(raw, output)
                observed.land(temp, variant_dir)  # the samples and loss log of this LoRA, never of another
                write_sidecar(sidecar_path(job), signature)
                if job.trainer.run_cache:
                    run_cache.store(layout.run_cache_dir, signature, output)
                    observed.store(run_cache.cached_file(layout.run_cache_dir, signature), variant_dir)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
    say(f"trained {job.label} -> {output}", echo=echo)


@doit_action
def train_action(job: TrainJob) -> bool | TaskFailed:
    """The doit python-action: :func:`run_training`, a TrainingError (or any error of ours, such
    as an output held open elsewhere) returned as TaskFailed.

    KeyboardInterrupt propagates (doit records finished tasks and exits 130).
    """
    run_training(job)
    return True
