"""The executor settings, the job's re-rooting for a worker, the launcher seam and the worker's orphan guard:
no Ray cluster needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_project
from charbuild.config import load_project
from charbuild.errors import ConfigError
from charbuild.train.executors import RAY
from charbuild.train.executors.payload import job_for_worker, project_relative, travels
from charbuild.train.executors.settings import EXECUTOR_CHECKS, normal_resources, parse_memory, ray_task_options
from charbuild.train.job import ModelSpec, TrainerSpec, TrainJob, job_specs
from charbuild.train.variants import resolve_variant


def test_defaults_are_the_local_executor_and_live_in_trainer_spec(tmp_path):
    project = load_project(make_project(tmp_path / "p"))
    from charbuild.layout import Layout

    _, trainer = job_specs(project, Layout(tmp_path / "p"))
    assert (trainer.executor, trainer.ray_address, trainer.resources, trainer.retries, trainer.shared_model,
            trainer.worker_cache) == ("local", None, {"GPU": 1}, 0, False, None)
    assert trainer == TrainerSpec(gpus=trainer.gpus, lock_dir=trainer.lock_dir, backend="fake")


@pytest.mark.extras("ray")  # executor = "ray" without Ray is a configuration error (tested below)
def test_ray_settings_are_read_into_the_trainer_spec(tmp_path):
    root = make_project(tmp_path / "p", project_extra='executor = "ray"\nray_address = "ray://head:10001"\n'
                        'retries = 2\nshared_model = true\nworker_cache = "/var/cache/cb"\n'
                        'resources = { CPU = 4, memory = "16GB", big_vram = 1 }\n')
    from charbuild.layout import Layout

    _, t = job_specs(load_project(root), Layout(root))
    assert (t.executor, t.ray_address, t.retries, t.shared_model, t.worker_cache) == \
        ("ray", "ray://head:10001", 2, True, "/var/cache/cb")
    assert t.resources == {"GPU": 1, "CPU": 4, "memory": 16 * 10**9, "big_vram": 1}
    assert TrainerSpec.from_dict(t.to_dict()) == t  # they travel in the job file
    assert ray_task_options(t.resources) == {"num_gpus": 1, "num_cpus": 4, "memory": 16 * 10**9,
                                             "resources": {"big_vram": 1}}
    assert ray_task_options(normal_resources({"GPU": 0.5})) == {"num_gpus": 0.5, "num_cpus": 1}


@pytest.mark.parametrize("line, key, words", [
    ('executor = "slurm"', "executor", "must be one of"),
    ("retries = -1", "retries", ">= 0"),
    ("retries = true", "retries", "whole number"),
    ('resources = { GPU = "one" }', "resources", "GPU = 'one'"),
    ('resources = { memory = "lots" }', "resources", "memory = 'lots'"),
    ("resources = 1", "resources", "must be a table"),
    ('ray_address = ""', "ray_address", "non-empty string"),
    ('shared_model = "yes"', "shared_model", "true or false"),
])
def test_bad_settings_are_reported_at_their_line(tmp_path, line, key, words):
    root = make_project(tmp_path / "p", project_extra=line + "\n")
    with pytest.raises(ConfigError) as err:
        load_project(root)
    text = str(err.value)
    assert f"'trainer.{key}'" in text and words in text, text
    lines = (root / "characters/project.toml").read_text(encoding="utf-8").splitlines()
    assert f"characters/project.toml:{lines.index(line) + 1}:" in text, text


def test_every_executor_key_has_a_checker_and_a_trainer_spec_field():
    fields = set(TrainerSpec.__dataclass_fields__)
    assert set(EXECUTOR_CHECKS) <= fields


def test_parse_memory():
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory(1000) == 1000
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory("0") is None and parse_memory(True) is None and parse_memory("8 GX") is None


def test_executor_ray_without_ray_installed_is_a_config_error_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes Ray unimportable in this process, as if not installed
    root = make_project(tmp_path / "p", project_extra='executor = "ray"\n')
    with pytest.raises(ConfigError) as err:
        load_project(root)
    text = str(err.value)
    assert "characters/project.toml:" in text and "pip install 'charbuild[ray]'" in text
    line = int(text.split("characters/project.toml:")[1].split(":")[0])
    assert (root / "characters/project.toml").read_text(encoding="utf-8").splitlines()[line - 1].startswith("executor")


def _job(root: Path, **trainer) -> TrainJob:
    return TrainJob(lora="k", kind="face", variant="v", project_root=str(root),
                    dataset_toml=str(root / "build/loras/k/dataset.toml"),
                    output=str(root / "build/loras/k/v/.train-x/k-v.safetensors"),
                    variant_dir=str(root / "build/loras/k/v"),
                    params=resolve_variant({"name": "v", "preset": "Lora1x1A1-AdamW8"}, steps=10),
                    model=ModelSpec(base="/models/sd15.safetensors"),
                    trainer=TrainerSpec(backend="fake", lock_dir=str(root / "build/locks"), **trainer),
                    inputs=(str(root / "build/images/k/face/64/f00.png"),))


def test_job_for_worker_reroots_every_project_path(tmp_path):
    root, worker = tmp_path / "プロジェクト", tmp_path / "w"
    wjob = job_for_worker(_job(root), worker, {"base": str(worker / "cache/sd15.safetensors")})
    assert wjob.project_root == str(worker)
    assert wjob.output == str(worker / "build/loras/k/v/.train-x/k-v.safetensors")
    assert wjob.variant_dir == str(worker / "build/loras/k/v")
    assert wjob.inputs == (str(worker / "build/images/k/face/64/f00.png"),)
    assert wjob.dataset_toml == str(worker / "build/loras/k/dataset.toml")
    assert wjob.trainer.lock_dir == str(worker / "build/locks")
    assert wjob.model.base == str(worker / "cache/sd15.safetensors") and wjob.model.vae is None
    assert wjob.params == _job(root).params
    with pytest.raises(ValueError, match="outside the project"):
        project_relative(tmp_path / "elsewhere.png", root)


def test_only_model_files_that_exist_here_travel(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    assert travels(str(model)) and travels(str(tmp_path))  # a file, a diffusers folder
    assert not travels("tiny") and not travels("tiny-sdxl:3") and not travels(None)  # generated on the worker
    assert not travels(str(tmp_path / "missing.safetensors"))


def test_the_ray_launcher_takes_no_local_gpu_and_its_dry_run_says_where(tmp_path):
    from charbuild.train import runner

    assert runner.get_launcher("ray") is RAY and not runner.takes_local_gpu(RAY)
    assert runner.takes_local_gpu(runner.get_launcher("local"))
    job = _job(tmp_path, executor="ray", gpus=(0, 1))
    lines = runner.dry_run_commands(job)
    assert "executor ray" in lines[0] and "CUDA_VISIBLE_DEVICES" not in lines[0]
    assert lines[-1] == ("# executor ray: one Ray task asking for GPU = 1 on a local Ray instance "
                         "started for the build (2 logical GPU(s))")
    assert not any("executor ray" in line for line in runner.dry_run_commands(_job(tmp_path)))


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_watchdog_stops_the_trainer_group_and_cleans_up_when_the_worker_dies(tmp_path):
    leftover = tmp_path / "copy"
    leftover.mkdir()
    # a stand-in "worker": starts a trainer in its own session and the watchdog, then dies
    worker = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
t = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
subprocess.Popen([sys.executable, "-m", "charbuild.train.executors.watchdog", str(__import__("os").getpid()),
                  str(t.pid), "1", {str(leftover)!r}], start_new_session=True)
print(t.pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    trainer = int(worker.stdout.readline())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(trainer, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the trainer outlived its worker")
    while leftover.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not leftover.exists()


def test_abandoned_worker_copies_are_removed_and_live_ones_kept(tmp_path):
    from filelock import FileLock

    from charbuild.train.executors.worker import COPY_PREFIX, IN_USE, remove_abandoned_copies

    live, dead, fresh, other = (tmp_path / f"{COPY_PREFIX}{n}" for n in ("live", "dead", "fresh", "other"))
    for d in (live, dead, fresh, other):
        (d / "build").mkdir(parents=True)
    held = FileLock(str(live / IN_USE))
    held.acquire()
    for d in (dead, fresh):
        (d / IN_USE).write_text("")
    old = time.time() - 3600
    for d in (live, dead):
        os.utime(d / IN_USE, (old, old))
    try:
        remove_abandoned_copies(tmp_path)
    finally:
        held.release()
    assert live.exists() and fresh.exists() and other.exists()  # locked, just made, not ours
    assert not dead.exists()


def test_a_launcher_without_local_gpu_runs_while_every_gpu_lock_is_held(tmp_path):
    """The seam the Ray launcher relies on: ``local_gpu = False`` -> no GPU lease here, ``gpu`` None;
    the runner still writes the sidecar and the run-cache entry."""
    import threading

    from charbuild.train import runner
    from charbuild.train.fake_trainer import write_fake_lora
    from charbuild.train.gpulock import gpu_lease
    from charbuild.train.hardware import training_slots

    class Remote:
        name = "remote-test"
        local_gpu = False
        seen: list = []

        def __call__(self, launch: runner.Launch) -> int:
            self.seen.append(launch.gpu)
            write_fake_lora(launch.job.output, launch.job.params.to_dict(), name=launch.job.title)
            return 0

    root = tmp_path / "p"
    inp = root / "build/images/k/face/64/f00.png"
    inp.parent.mkdir(parents=True)
    inp.write_bytes(b"picture")
    job = TrainJob.from_dict({**_job(root).to_dict(), "output": str(root / "build/loras/k/v/raw.safetensors")})
    launcher = Remote()
    done = threading.Event()
    slots = training_slots(job.trainer.gpus, job.trainer.cpu_trainings)
    with gpu_lease(Path(job.trainer.lock_dir), slots):  # every GPU (or CPU slot) of this machine is busy
        worker = threading.Thread(target=lambda: (runner.run_training(job, echo=False, launcher=launcher), done.set()))
        worker.start()
        worker.join(timeout=60)
    assert done.is_set(), "the runner waited for a local GPU"
    assert launcher.seen == [None]
    assert runner.is_up_to_date(job).fresh
    assert "training k/v with executor remote-test" in (root / "build/loras/k/v/train.log").read_text(encoding="utf-8")


def test_tcp_target_of_ray_addresses():
    from charbuild.train.executors.cluster import tcp_target

    assert tcp_target("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert tcp_target("ray://head.local:10001") == ("head.local", 10001)
    assert tcp_target("[::1]:6379") == ("::1", 6379)
    assert tcp_target("auto") is None and tcp_target("head") is None and tcp_target(":6379") is None


def test_a_ray_client_server_that_fails_to_start_its_side_is_tried_again(capsys):
    """ray-project/ray#63202: the proxy's forked per-connection server may crash at once."""
    from charbuild.errors import TrainingError
    from charbuild.train.executors.cluster import init_with_retries

    crash = ConnectionAbortedError("Initialization failure from server:\nRuntimeError: Starting Ray client server "
                                   "failed. See ray_client_server_23000.err for detailed logs.")
    calls, shutdowns = [], []

    def init_failing(times, error=crash):
        def init():
            calls.append(1)
            if len(calls) <= times:
                raise error
        return init

    init_with_retries(init_failing(2), lambda: shutdowns.append(1), "ray://h:10001", pause=0)
    assert len(calls) == 3 and len(shutdowns) == 2
    assert capsys.readouterr().err.count("trying again") == 2  # stderr: the driver's log, not a dry run's listing

    calls.clear()
    with pytest.raises(TrainingError, match=r"failed 3 times .*ray-project/ray#63202.*GCS address"):
        init_with_retries(init_failing(9), lambda: None, "ray://h:10001", attempts=3, pause=0)
    assert len(calls) == 3

    calls.clear()  # the same crash, seen by the proxy as a zombie when it reads the server's command line
    zombie = ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n  File \".../proxier.py\", line 765,"
        " in Datapath\n    if not self.proxy_manager.start_specific_server(\n...\npsutil.ZombieProcess: PID still "
        "exists but it's a zombie (pid=24336)\n")
    init_with_retries(init_failing(1, zombie), lambda: None, "ray://h:10001", pause=0)
    assert len(calls) == 2

    calls.clear()  # any other failure is not Ray Client's crash: at once, as it came
    with pytest.raises(ConnectionRefusedError):
        init_with_retries(init_failing(9, ConnectionRefusedError("no")), lambda: None, "ray://h:10001", pause=0)
    assert len(calls) == 1
