"""The training runner: temp output, atomic raw file + sidecar, failures, stopping, freshness."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doit.exceptions import TaskFailed
from safetensors import safe_open

from charbuild.errors import TrainingError
from charbuild.train.gpulock import acquire_gpu
from charbuild.train.hardware import training_slots
from charbuild.train.runner import (
    dry_run_commands,
    is_up_to_date,
    log_tail,
    run_training,
    sidecar_path,
    train_action,
)
from conftest import fake_backend_job as make_job, wait_for

FAKE_SD = Path(__file__).resolve().parent / "fake_sd_scripts"
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX here")


def temp_dirs(job) -> list[Path]:
    return sorted(Path(job.variant_dir).glob(".train-*"))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead: nobody may reap it in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# --------------------------------------------------------------------------- success


def test_fake_backend_success_moves_raw_and_writes_sidecar(tmp_path, capfd, with_gpus):
    record = tmp_path / "record.jsonl"
    job = make_job(tmp_path, fake_record=str(record), fake_seconds=0.3)
    run_training(job)
    out = Path(job.output)
    assert out.is_file() and sidecar_path(job).is_file()
    assert temp_dirs(job) == []
    sig = json.loads(sidecar_path(job).read_text(encoding="utf-8"))
    assert sorted(sig["files"]) == ["characters/k/face/f00.png", "characters/k/face/f00.txt",
                                    "characters/k/face/f01.png", "characters/k/face/f01.txt"]
    assert sig["extra"] == json.loads(json.dumps(job.signature_extra))
    rec = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["gpu"] == "0" and rec[0]["ok"] is True
    assert rec[0]["lora"] == "k" and rec[0]["end"] >= rec[0]["start"] + 0.3
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
        keys = set(f.keys())
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    assert meta["modelspec.trigger_phrase"] == "k, girl"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_output_name"] == "k-Lora3x3A50p-AdamW8"  # <lora>-<variant>
    assert json.loads(meta["ss_tag_frequency"]) == {"characters/k/face": {"from front": 2, "k": 2, "white background": 2}}
    assert down.shape == (4, 320, 3, 3)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    log = (Path(job.variant_dir) / "train.log").read_bytes()
    assert b"fake trainer pid=" in log and b"\rsteps: 10/10\n" in log  # \r progress relayed as bytes
    assert "fake trainer pid=" in capfd.readouterr().out  # and echoed to the console
    # Same inputs and params -> byte-identical file (downstream md5 early cut-off).
    first = out.read_bytes()
    run_training(job, echo=False)
    assert out.read_bytes() == first


def test_sd_scripts_backend_runs_the_script_in_the_project_root(tmp_path, monkeypatch, with_gpus):
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("FAKE_SD_ARGV", str(argv_log))
    job = make_job(tmp_path, backend="sd-scripts", gpus=[3])
    assert train_action(job) is True
    assert Path(job.output).is_file() and is_up_to_date(job).fresh
    call = json.loads(argv_log.read_text().splitlines()[0])
    assert call["cwd"] == str(tmp_path) and call["gpu"] == "3"
    assert call["argv"][0].endswith("train_network.py")
    out_dir = next(a for a in call["argv"] if a.startswith("--output_dir=")).split("=", 1)[1]
    assert Path(out_dir).parent == Path(job.variant_dir) and Path(out_dir).name.startswith(".train-")
    assert temp_dirs(job) == []
    with safe_open(job.output, "np") as f:
        assert f.metadata()["ss_output_name"] == "k-Lora3x3A50p-AdamW8"  # <lora>-<variant>


def test_sd_scripts_sdxl_through_the_runner(tmp_path):
    job = make_job(tmp_path, backend="sd-scripts")
    job = job.with_model(arch="sdxl")
    run_training(job, echo=False)
    with safe_open(job.output, "np") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_te1_") for k in f.keys())


# --------------------------------------------------------------------------- failure


def test_failure_raises_with_log_tail_and_leaves_no_raw(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SD_FAIL", "1")
    job = make_job(tmp_path, backend="sd-scripts")
    with pytest.raises(TrainingError) as err:
        run_training(job, echo=False)
    msg = str(err.value)
    log = Path(job.variant_dir) / "train.log"
    assert "exit status 1" in msg and "CUDA out of memory (fake)" in msg and str(log) in msg
    assert "steps: 100%" in msg  # \r redraws reduced to the final state
    assert not Path(job.output).exists() and not sidecar_path(job).exists()
    assert temp_dirs(job) == []


def test_zero_data_loader_workers_train_through_sd_scripts(tmp_path):
    job = make_job(tmp_path, backend="sd-scripts")
    job = job.with_params(data_loader_workers=0)  # a common setting on Windows and small machines
    run_training(job, echo=False)
    assert Path(job.output).is_file()
    assert "--max_data_loader_n_workers=0" in (Path(job.variant_dir) / "train.log").read_text(encoding="utf-8")


def test_bad_arguments_fail_the_training(tmp_path):
    job = make_job(tmp_path, backend="sd-scripts", extra_args=["--no_such_flag"])
    with pytest.raises(TrainingError, match="unrecognized arguments: --no_such_flag"):
        run_training(job, echo=False)


def test_train_action_returns_task_failed_and_removes_a_stale_sidecar(tmp_path):
    job = make_job(tmp_path)
    run_training(job, echo=False)
    assert is_up_to_date(job).fresh
    job = job.with_trainer(extra={**job.trainer.extra, "fake_fail": True})
    job = job.with_trainer(run_cache=False)  # else the earlier result is restored, not retrained
    result = train_action(job)
    assert isinstance(result, TaskFailed) and "failing as asked" in str(result)
    # The old raw file stays, but without its sidecar it is stale: it will be retrained.
    assert Path(job.output).is_file() and not sidecar_path(job).exists()
    assert is_up_to_date(job) == (False, "no signature of a finished training")


def test_missing_input_and_unknown_backend_are_training_errors(tmp_path):
    job = make_job(tmp_path)
    job = dataclasses.replace(job, inputs=job.inputs + (str(tmp_path / "gone.png"),))
    with pytest.raises(TrainingError, match="cannot read a training input"):
        run_training(job, echo=False)
    job = make_job(tmp_path, backend="kohya")
    with pytest.raises(TrainingError, match="unknown trainer backend 'kohya'"):
        run_training(job, echo=False)
    assert temp_dirs(job) == []


def test_trainer_that_exits_0_without_output_is_an_error(tmp_path):
    job = make_job(tmp_path, backend="sd-scripts", python=sys.executable)
    job = job.with_trainer(sd_scripts=str(tmp_path / "noop"))
    (tmp_path / "noop").mkdir()
    (tmp_path / "noop" / "train_network.py").write_text("print('did nothing')\n")
    with pytest.raises(TrainingError, match="wrote no"):
        run_training(job, echo=False)


# --------------------------------------------------------------------------- freshness


def test_is_up_to_date_follows_content_not_mtime(tmp_path):
    job = make_job(tmp_path)
    assert is_up_to_date(job) == (False, "not trained yet")
    run_training(job, echo=False)
    assert is_up_to_date(job) == (True, "up to date")
    txt = Path(job.inputs[1])
    os.utime(txt, ns=(time.time_ns() + 5_000_000_000,) * 2)  # touch: same content
    assert is_up_to_date(job).fresh
    txt.write_text("k, black background", encoding="utf-8")
    fresh, reason = is_up_to_date(job)
    assert not fresh and reason == "input changed: characters/k/face/f00.txt"
    assert not is_up_to_date(job)  # truthiness is freshness (safe as a doit uptodate result)
    run_training(job, echo=False)
    assert is_up_to_date(job).fresh
    changed = dataclasses.replace(job, signature_extra={**job.signature_extra, "params": {**job.params.to_dict(), "dim": 8}})
    assert is_up_to_date(changed) == (False, "settings changed: params")


def test_signature_is_taken_at_start_so_edits_during_training_make_it_stale(tmp_path):
    job = make_job(tmp_path, fake_seconds=1.5)
    import threading

    t = threading.Thread(target=run_training, args=(job,), kwargs={"echo": False})
    t.start()
    wait_for(lambda: temp_dirs(job))
    time.sleep(0.3)
    Path(job.inputs[3]).write_text("k, edited while training", encoding="utf-8")
    t.join(30)
    assert Path(job.output).is_file()
    assert is_up_to_date(job) == (False, "input changed: characters/k/face/f01.txt")


def test_inputs_are_hashed_once_per_training(tmp_path, monkeypatch):
    """The run-cache look-up and the signature taken under the GPU lock share the MD5s of
    files that did not change in between; a file edited in between is read again."""
    import charbuild.signature as sig

    job = make_job(tmp_path)
    reads: list[str] = []
    real_md5 = sig.file_md5
    monkeypatch.setattr(sig, "file_md5", lambda f: reads.append(Path(f).name) or real_md5(f))
    run_training(job, echo=False)
    assert sorted(reads) == sorted(Path(p).name for p in job.inputs)
    first = sig.compute_signature(job.inputs, job.project_root, job.signature_extra)
    edited = Path(job.inputs[1])
    edited.write_text("k, edited", encoding="utf-8")
    os.utime(edited, ns=(time.time_ns() + 5_000_000_000,) * 2)
    reads.clear()
    again = sig.compute_signature(job.inputs, job.project_root, job.signature_extra, known=first)
    assert reads == [edited.name]
    assert again == sig.compute_signature(job.inputs, job.project_root, job.signature_extra)


# --------------------------------------------------------------------------- dry run


def test_dry_run_commands_per_backend(tmp_path):
    for backend, expect in (("builtin", "-m charbuild.train.builtin"), ("fake", "-m charbuild.train.fake_trainer"),
                            ("sd-scripts", "train_network.py --pretrained_model_name_or_path=")):
        lines = dry_run_commands(make_job(tmp_path, backend=backend))
        assert lines[0].startswith("# k/Lora3x3A50p-AdamW8: backend " + backend)
        assert expect in lines[1] and ".train-XXXXXXXX" in lines[1]
    assert not (tmp_path / "build" / "loras" / "k" / "Lora3x3A50p-AdamW8").exists()


def test_log_tail_reduces_carriage_return_redraws(tmp_path):
    log = tmp_path / "l.log"
    log.write_bytes(b"a\nstep 1\rstep 2\rstep 3\n\nlast\r\n")
    assert log_tail(log) == ["a", "step 3", "last"]
    assert log_tail(log, 1) == ["last"]


# --------------------------------------------------------------------------- stopping

RUNNER = """
import signal, sys
from charbuild.train.job import TrainJob
from charbuild.train.runner import run_training
def term(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, term)   # what the dodo's handler does
try:
    run_training(TrainJob.from_json(sys.argv[1]))
except KeyboardInterrupt:
    print("runner: interrupted", flush=True)
    sys.exit(130)
"""


def start_runner(tmp_path, job):
    job_file = tmp_path / "runner-job.json"
    job_file.write_text(job.to_json(), encoding="utf-8")
    out = open(tmp_path / "runner.out", "wb")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(job_file)], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    log = Path(job.variant_dir) / "train.log"

    def pids():
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        found = dict(re.findall(r"fake trainer (pid|grandchild pid)=(\d+)", text))
        want = 2 if job.trainer.extra.get("fake_grandchild") else 1
        return found if len(found) == want else None

    found = wait_for(pids)
    return proc, int(found["pid"]), int(found.get("grandchild pid", 0)) or None


@POSIX_ONLY
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_the_process_group_and_leaves_nothing(tmp_path, sig):
    job = make_job(tmp_path, fake_seconds=60, fake_grandchild=True)
    proc, child, grandchild = start_runner(tmp_path, job)
    assert alive(child) and alive(grandchild)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 130
    assert "runner: interrupted" in (tmp_path / "runner.out").read_text()
    wait_for(lambda: not alive(child) and not alive(grandchild), timeout=5)
    assert not Path(job.output).exists() and not sidecar_path(job).exists()
    assert temp_dirs(job) == []
    slot = training_slots(job.trainer.gpus)  # the runner's: a GPU here, or a CPU slot
    with acquire_gpu(job.trainer.lock_dir, slot, poll=0.05, on_wait=None) as gpu:  # lock released
        assert gpu == slot[0]


@POSIX_ONLY
def test_sigkilled_runner_leaves_no_raw_and_the_next_run_trains(tmp_path):
    job = make_job(tmp_path, fake_seconds=60)
    proc, child, _ = start_runner(tmp_path, job)
    proc.kill()
    proc.wait(timeout=10)
    # The orphaned trainer dies at its next write to the closed pipe; until then it keeps
    # the GPU lock it inherited, so no other training can start on that GPU meanwhile.
    with acquire_gpu(job.trainer.lock_dir, training_slots(job.trainer.gpus), poll=0.01, on_wait=None):
        assert not alive(child)
    assert not Path(job.output).exists()
    assert len(temp_dirs(job)) == 1  # the partial output stays in the temp folder only
    assert not is_up_to_date(job).fresh
    job = job.with_trainer(extra={**job.trainer.extra, "fake_seconds": 0})
    run_training(job, echo=False)
    assert is_up_to_date(job).fresh and temp_dirs(job) == []
