"""The GPU lock: one training per GPU across threads and processes, released when its holder dies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from charbuild.train import hardware
from charbuild.train.gpulock import acquire_gpu, gpu_lease, wait_message
from charbuild.train.runner import run_training
from conftest import fake_backend_job as make_job, wait_for


def test_first_free_gpu_is_taken_in_order(tmp_path):
    with acquire_gpu(tmp_path, [0, 1], on_wait=None) as a:
        with acquire_gpu(tmp_path, [0, 1], on_wait=None) as b:
            assert (a, b) == (0, 1)
        with acquire_gpu(tmp_path, ["1", "0"], on_wait=None) as c:
            assert c == "1"
    with gpu_lease(tmp_path, [0], on_wait=None) as lease:
        assert lease.gpu == 0 and lease.lock_path == tmp_path / "gpu-0.lock"
        assert lease.lock_fd is None or isinstance(lease.lock_fd, int)


def test_busy_gpus_wait_with_one_message(tmp_path):
    messages, got = [], []

    def hold_briefly():
        with acquire_gpu(tmp_path, [0], poll=0.02, on_wait=messages.append):
            got.append(time.monotonic())

    with acquire_gpu(tmp_path, [0], on_wait=None):
        waiter = threading.Thread(target=hold_briefly)
        waiter.start()
        time.sleep(0.3)
        assert got == []  # still waiting
        released = time.monotonic()
    waiter.join(5)
    assert len(got) == 1 and got[0] >= released
    assert messages == [wait_message([0])]  # once, however long the wait
    assert "waiting for a free GPU" in messages[0]


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = (
        "import sys, time\n"
        "from charbuild.train.gpulock import acquire_gpu\n"
        "with acquire_gpu(sys.argv[1], [0], on_wait=None):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    messages = []
    threading.Timer(0.3, proc.kill).start()
    start = time.monotonic()
    with acquire_gpu(tmp_path, [0], poll=0.02, on_wait=messages.append) as gpu:
        assert gpu == 0 and time.monotonic() - start >= 0.25
    assert len(messages) == 1
    proc.wait(5)
    proc.stdout.close()


def test_no_gpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="trainer.gpus is empty"):
        with acquire_gpu(tmp_path, []):
            pass


def _two_trainings(tmp_path, gpus, **trainer):
    record = tmp_path / "record.jsonl"
    jobs = [make_job(tmp_path, lora=name, gpus=gpus, fake_seconds=0.8, fake_record=str(record), lock_poll=0.05,
                     **trainer)
            for name in "ab"]
    errors = []

    def run(job):
        try:
            run_training(job, echo=False)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    recs = sorted((json.loads(line) for line in record.read_text().splitlines()), key=lambda r: r["start"])
    assert [r["ok"] for r in recs] == [True, True] and {r["lora"] for r in recs} == {"a", "b"}
    assert all(Path(j.output).is_file() for j in jobs)
    return recs


def test_one_gpu_serialises_trainings(tmp_path, with_gpus):
    first, second = _two_trainings(tmp_path, [0])
    assert first["end"] <= second["start"]
    assert first["gpu"] == second["gpu"] == "0"


def test_two_gpus_train_in_parallel_on_different_devices(tmp_path, with_gpus):
    first, second = _two_trainings(tmp_path, [0, 1])
    assert second["start"] < first["end"]  # they overlap
    assert {first["gpu"], second["gpu"]} == {"0", "1"}


def test_without_a_gpu_one_cpu_training_at_a_time_whatever_the_gpus(tmp_path, without_gpu):
    first, second = _two_trainings(tmp_path, [0, 1])
    assert first["end"] <= second["start"]
    assert first["gpu"] == second["gpu"] == ""  # no GPU shown to the trainer
    assert sorted(p.name for p in (tmp_path / "build/locks").glob("*.lock")) == ["gpu-cpu0.lock"]


def test_without_a_gpu_cpu_trainings_run_side_by_side_on_their_share_of_the_cores(tmp_path, without_gpu):
    first, second = _two_trainings(tmp_path, [0], cpu_trainings=2)
    assert second["start"] < first["end"]  # they overlap
    assert sorted(p.name for p in (tmp_path / "build/locks").glob("*.lock")) == ["gpu-cpu0.lock", "gpu-cpu1.lock"]
    for lora in "ab":
        log = (tmp_path / f"build/loras/{lora}/Lora3x3A50p-AdamW8/train.log").read_text(encoding="utf-8")
        assert "on the CPU (no GPU found; slot " in log and "of [trainer] cpu_trainings = 2, 2 threads)" in log


def test_cpu_slots_and_what_a_trainer_on_one_is_given(monkeypatch, without_gpu):
    assert hardware.training_slots([0, 1], 1) == ["cpu0"]
    assert hardware.training_slots([0], 3) == ["cpu0", "cpu1", "cpu2"]
    assert hardware.slot_env("cpu1", 2) == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    assert hardware.slot_env("cpu0", 1) == {"CUDA_VISIBLE_DEVICES": ""}  # one at a time: the trainer picks
    assert hardware.slot_env("cpu0", 8) == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # at least one
    monkeypatch.setenv("CHARBUILD_TORCH_THREADS", "3")  # the user's count is kept
    assert hardware.slot_env("cpu0", 2) == {"CUDA_VISIBLE_DEVICES": ""}
    assert hardware.where_it_trains("cpu0", 2) == "on the CPU (no GPU found; slot 0 of [trainer] cpu_trainings = 2)"
    assert "cpu_trainings = 2, all busy" in wait_message(["cpu0", "cpu1"])
    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: True)
    assert hardware.training_slots([0, 1], 4) == [0, 1]  # cpu_trainings counts only without a GPU
    assert hardware.slot_env(1, 4) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert hardware.where_it_trains(1, 4) == "on GPU 1"


def test_same_variant_waits_for_the_running_training(tmp_path):
    """Two runs of one variant (two doit processes) never share its folder."""
    record = tmp_path / "record.jsonl"
    job = make_job(tmp_path, gpus=[0, 1], fake_seconds=0.6, fake_record=str(record))
    job = job.with_trainer(run_cache=False)  # the second run would be restored from the first
    threads = [threading.Thread(target=run_training, args=(job,), kwargs={"echo": False}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    recs = sorted((json.loads(line) for line in record.read_text().splitlines()), key=lambda r: r["start"])
    assert len(recs) == 2 and recs[0]["end"] <= recs[1]["start"]
    wait_for(lambda: Path(job.output).is_file())
