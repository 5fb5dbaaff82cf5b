"""The Ray executor on a real local cluster: a head and a second worker node, one logical GPU each.

No part of Ray is replaced. Drivers are separate ``charbuild`` processes (as a user runs
them), so this test process never becomes a Ray driver; the cluster is shared by the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.extras("ray"),
              pytest.mark.skipif(os.name != "posix", reason="the test cluster and signals are POSIX here")]
pytest.importorskip("ray", reason='needs the optional \'ray\', which is not installed (pip install -e ".[ray]")')

from conftest import make_project  # noqa: E402
from graphtools import build  # noqa: E402
from ray_cluster import LocalCluster  # noqa: E402

from charbuild.layout import Layout  # noqa: E402
from charbuild.train.executors.driver import DRIVER_FILE, DRIVER_LOG  # noqa: E402

VARIANT = "Lora1x1A1-AdamW8"
LORAS = ("alc", "alcdr", "bbo")
#: Seconds this whole module may take, cluster start included (~3 min on 2 busy cores): every
#: wait below is cut to what is left, so a hang fails the module instead of stalling CI.
BUDGET = float(os.environ.get("CHARBUILD_RAY_TEST_BUDGET", "480"))
_deadline = [time.monotonic() + BUDGET]
_drivers: list[subprocess.Popen] = []  # the charbuild processes started in the background


def left(wanted: float) -> float:
    """``wanted`` seconds, or what is left of the module's budget if less; fails once it is spent."""
    remaining = _deadline[0] - time.monotonic()
    if remaining <= 1:
        pytest.fail(f"the Ray tests ran past their budget of {BUDGET:.0f} s (CHARBUILD_RAY_TEST_BUDGET)")
    return min(wanted, remaining)


@pytest.fixture(scope="module")
def cluster():
    _deadline[0] = time.monotonic() + BUDGET
    c = LocalCluster(head_gpus=1, head_cpus=2, workers=((1, 1),), client_server=True)
    try:
        yield c
    finally:
        for proc in _drivers:  # one left running by a failed test must not outlive the module
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        c.stop()


def ray_project(root: Path, cluster: LocalCluster, trainer: str = "", fake: str = "", address: str | None = None,
                **kwargs) -> Path:
    """A project training on ``cluster`` (at ``address``, default its GCS address): ``trainer``
    more [trainer] lines, ``fake`` the fake backend's knobs."""
    return make_project(root, project_extra=f'executor = "ray"\nray_address = "{address or cluster.address}"\n{trainer}'
                        f"[trainer.extra]\n{fake}", **kwargs)


#: The build's Ray driver exits this soon after its last training: each test's project has its own.
DRIVER_IDLE_S = 4


def driver_env(cluster: LocalCluster, idle: float = DRIVER_IDLE_S) -> dict[str, str]:
    env = dict(cluster.env, CHARBUILD_RAY_DRIVER_IDLE=str(idle))
    return env | {k: v for k, v in os.environ.items() if k == "SOURCE_DATE_EPOCH"}


def charbuild(cluster: LocalCluster, root: Path, *args: str, timeout: float = 240,
              idle: float = DRIVER_IDLE_S) -> subprocess.CompletedProcess:
    env = driver_env(cluster, idle)
    return subprocess.run([sys.executable, "-m", "charbuild.cli", *args, "--root", str(root)], env=env,
                          capture_output=True, text=True, timeout=left(timeout))


def start_charbuild(cluster: LocalCluster, root: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "charbuild.cli", *args, "--root", str(root)], env=driver_env(cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _drivers.append(proc)
    return proc


def driver_file(root: Path, name: str = DRIVER_FILE) -> Path:
    """The build's Ray driver's address file (``DRIVER_LOG``: its log) in ``root``'s locks folder."""
    return Layout(root).locks_dir / name


def vdir(root: Path, lora: str) -> Path:
    return root / "build" / "loras" / lora / VARIANT


def wait_for_trainer(proc: subprocess.Popen, log: Path, timeout: float = 120) -> tuple[int, int]:
    """(worker pid, trainer pid) once the remote trainer of build ``proc`` has started and said so in train.log."""
    t0 = time.time()
    deadline = t0 + left(timeout)
    while time.time() < deadline:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        worker, trainer = re.search(r"worker pid (\d+)", text), re.search(r"fake trainer pid=(\d+)", text)
        if worker and trainer:
            return int(worker.group(1)), int(trainer.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"the build exited with {proc.returncode} before its remote training started:\n"
                                 f"{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"the remote training did not start within {time.time() - t0:.0f} s; {log}: {text[-2000:]}")


def gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def overlap(records: list[dict]) -> int:
    """The most trainings that ran at the same moment."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_fake_trainings_on_two_nodes_match_the_local_executor(cluster, tmp_path):
    local = make_project(tmp_path / "local")
    build(local, "train")
    record = tmp_path / "record.jsonl"
    remote = ray_project(tmp_path / "remote", cluster, fake=f'fake_seconds = 2\nfake_record = "{record.as_posix()}"\n')
    out = charbuild(cluster, remote, "build", "-n", "3", "train")
    assert out.returncode == 0, out.stdout + out.stderr
    for lora in LORAS:
        a, b = vdir(local, lora), vdir(remote, lora)
        assert (b / "raw.safetensors").read_bytes() == (a / "raw.safetensors").read_bytes(), lora
        assert (b / "metrics.jsonl").read_bytes() == (a / "metrics.jsonl").read_bytes(), lora  # came back too
        saved = json.loads((b / "raw.json").read_text(encoding="utf-8"))
        assert saved["extra"] == json.loads((a / "raw.json").read_text(encoding="utf-8"))["extra"]
        log = (b / "train.log").read_text(encoding="utf-8")
        assert "running on node" in log and "fake trainer: wrote" in log  # streamed from the worker
    # one Ray driver for the whole build: the three doit processes all went through it
    drivers = {re.search(r"the build's Ray driver \(pid (\d+)", (vdir(remote, lora) / "train.log").read_text(
        encoding="utf-8")).group(1) for lora in LORAS}
    assert len(drivers) == 1, drivers
    records = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3 and all(r["ok"] for r in records)
    assert overlap(records) <= 2  # two logical GPUs in the cluster, doit ran three at once
    assert {r["gpu"] for r in records} == {"0"}  # Ray's CUDA_VISIBLE_DEVICES: each node has GPU 0
    # the incremental contract: the sidecars make everything fresh, nothing trains again
    again = charbuild(cluster, remote, "build", "train")
    assert again.returncode == 0 and "training " not in again.stdout, again.stdout
    assert len(record.read_text(encoding="utf-8").splitlines()) == 3


def test_the_build_driver_exits_when_idle(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster)
    out = charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    assert out.returncode == 0, out.stdout + out.stderr
    pid = int(re.search(r"the build's Ray driver \(pid (\d+)", (vdir(root, "bbo") / "train.log").read_text(
        encoding="utf-8")).group(1))
    info = driver_file(root)
    assert json.loads(info.read_text(encoding="utf-8"))["pid"] == pid
    assert info.stat().st_mode & 0o077 == 0  # it holds the driver's key: this user's only
    assert gone(pid, timeout=left(DRIVER_IDLE_S + 30)), "the driver outlived its idle time"
    assert not info.exists()
    again = charbuild(cluster, root, "build", f"train:alc/{VARIANT}")  # a later build starts a new one
    assert again.returncode == 0, again.stdout + again.stderr


def test_builtin_tiny_training_is_byte_identical_to_local(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the metadata's timestamps; the driver forwards it
    # float sums depend on the thread count, which the trainer takes from the load: the nodes have 1
    monkeypatch.setenv("CHARBUILD_TORCH_THREADS", cluster.env["CHARBUILD_TORCH_THREADS"])
    monkeypatch.setenv("CHARBUILD_DEVICE", cluster.env["CHARBUILD_DEVICE"])
    chars = {"bob": {"keyword": "bbo", "face": ["f00", "f03"], "outfits": {}}}
    local = make_project(tmp_path / "local", sizes=(64,), characters=chars)
    remote = ray_project(tmp_path / "remote", cluster, sizes=(64,), characters=chars)
    for root in (local, remote):
        toml = root / "characters" / "project.toml"
        toml.write_text(toml.read_text(encoding="utf-8").replace('backend = "fake"', 'backend = "builtin"'),
                        encoding="utf-8")
    build(local, "train")
    out = charbuild(cluster, remote, "build", "train")
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = vdir(local, "bbo") / "raw.safetensors", vdir(remote, "bbo") / "raw.safetensors"
    assert b.read_bytes() == a.read_bytes()
    # the loss log lands beside the LoRA as locally (the report reads it); its lines carry no times
    local_metrics = [json.loads(x) for x in (a.parent / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    remote_metrics = [json.loads(x) for x in (b.parent / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m.get("loss") for m in remote_metrics] == [m.get("loss") for m in local_metrics] and local_metrics


def test_sd_scripts_backend_on_ray_samples_like_local(cluster, tmp_path):
    """The sd-scripts backend (the fake script) on a worker: its prompt file is written there and
    its samples come back as ``samples/<step>/<name>.png``, as a local training leaves them."""
    from checkpoint_files import write_layout_checkpoint

    fake_sd = Path(__file__).resolve().parent / "fake_sd_scripts"
    chars = {"bob": {"keyword": "bbo", "face": ["f00", "f03"], "outfits": {}}}
    trainer = (f'backend = "sd-scripts"\nsd_scripts = "{fake_sd.as_posix()}"\npython = "{Path(sys.executable).as_posix()}"\n'
               "accelerate = false\n")
    roots = {"local": make_project(tmp_path / "local", characters=chars, project_extra=trainer),
             "remote": ray_project(tmp_path / "remote", cluster, characters=chars, trainer=trainer)}
    for root in roots.values():
        write_layout_checkpoint(root / "model.safetensors", "sd15")
        toml = root / "characters" / "project.toml"
        text = toml.read_text(encoding="utf-8").replace('backend = "fake"\n', "").replace("dim = 4\n", "dim = 4\nsample_every = 2\n")
        toml.write_text('[model]\nbase = "model.safetensors"\n' + text, encoding="utf-8")
    build(roots["local"], "train")
    out = charbuild(cluster, roots["remote"], "build", "train")
    assert out.returncode == 0, out.stdout + out.stderr
    samples = {name: sorted(p.relative_to(vdir(root, "bbo")).as_posix() for p in (vdir(root, "bbo") / "samples").rglob("*.png"))
               for name, root in roots.items()}
    assert samples["local"] and samples["remote"] == samples["local"], samples
    assert "fake sd-scripts: wrote" in (vdir(roots["remote"], "bbo") / "train.log").read_text(encoding="utf-8")
    assert (vdir(roots["remote"], "bbo") / "raw.safetensors").is_file()


def test_model_travels_once_and_then_only_the_inputs(cluster, tmp_path):
    from checkpoint_files import write_sized_checkpoint

    model = write_sized_checkpoint(tmp_path / "model.safetensors", "sd15", 300_000)
    cache = tmp_path / "worker-cache"
    root = ray_project(tmp_path / "p", cluster, trainer=f'worker_cache = "{cache.as_posix()}"\n')
    toml = root / "characters" / "project.toml"
    toml.write_text(f'[model]\nbase = "{model.as_posix()}"\n' + toml.read_text(encoding="utf-8"), encoding="utf-8")
    out = charbuild(cluster, root, "build", "-n", "3", "train")  # at once: one fetches, the node's lock holds the rest
    assert out.returncode == 0, out.stdout + out.stderr
    # and the build's one driver put the model into the object store once for the three
    driver_log = driver_file(root, DRIVER_LOG).read_text(encoding="utf-8")
    put = re.findall(r"so far: \d+ bytes of inputs, (\d+) bytes of model", driver_log)
    assert len(put) == 3 and int(put[-1]) == model.stat().st_size, driver_log
    moved = []
    for lora in LORAS:
        log = (vdir(root, lora) / "train.log").read_text(encoding="utf-8")
        m = re.search(r"(\d+) bytes of inputs \(own inputs: (\d+)\), (\d+) bytes of model", log)
        assert m, log
        inputs, own, model_bytes = map(int, m.groups())
        assert inputs == own
        moved.append(model_bytes)
    # both nodes of this test cluster share one machine and so one cache folder: the model moves once
    assert sorted(moved) == [0, 0, model.stat().st_size]
    kept = list(cache.glob("*/model.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == model.read_bytes()


def test_killed_worker_fails_the_target_and_the_next_build_retrains(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster, fake="fake_seconds = 60\n")
    proc = start_charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    worker, trainer = wait_for_trainer(proc, vdir(root, "bbo") / "train.log")
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=left(120))
    assert proc.returncode != 0
    assert "was lost mid-training" in out and re.search(r"worker on node \S+ \(.*worker pid \d+\)", out), out
    assert "fake trainer pid=" in out  # the log's last lines are in the message
    assert gone(trainer), "the orphaned trainer still runs"
    assert not (vdir(root, "bbo") / "raw.safetensors").exists()
    assert not (vdir(root, "bbo") / "raw.json").exists()
    toml = root / "characters" / "project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("fake_seconds = 60", "fake_seconds = 0"),
                    encoding="utf-8")
    out = charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (vdir(root, "bbo") / "raw.safetensors").is_file()


def test_a_lost_worker_is_retried_when_retries_allow(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster, trainer="retries = 1\n", fake="fake_seconds = 3\n")
    proc = start_charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    worker, _ = wait_for_trainer(proc, vdir(root, "bbo") / "train.log")
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=left(120))
    assert proc.returncode == 0, out
    assert "was lost mid-training" in out and "attempt 2/2" in out
    assert (vdir(root, "bbo") / "raw.safetensors").is_file()


def test_driver_sigterm_cancels_the_remote_training(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster, fake="fake_seconds = 60\n")
    proc = start_charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    _, trainer = wait_for_trainer(proc, vdir(root, "bbo") / "train.log")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=left(60))
    assert proc.returncode != 0, out
    assert gone(trainer), "the remote trainer still runs after the driver stopped"
    assert not (vdir(root, "bbo") / "raw.safetensors").exists()
    deadline = time.time() + left(60)
    while cluster.free_gpus() < 2 and time.time() < deadline:
        time.sleep(1)
    assert cluster.free_gpus() == 2  # the task let go of its GPU


def kill_build_and_check_the_remote_training_stops(cluster: LocalCluster, root: Path) -> None:
    """Start a 60 s training of bbo, SIGKILL its build process once the remote trainer runs:
    the trainer must stop and its GPU come free (no handler runs: the driver sees the connection close)."""
    proc = start_charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    _, trainer = wait_for_trainer(proc, vdir(root, "bbo") / "train.log")
    proc.kill()
    proc.communicate(timeout=left(60))
    assert gone(trainer, timeout=left(30)), "the remote trainer still runs after its build process was killed"
    deadline = time.time() + left(60)
    while cluster.free_gpus() < 2 and time.time() < deadline:
        time.sleep(1)
    assert cluster.free_gpus() == 2


def test_a_killed_build_process_cancels_its_remote_training(cluster, tmp_path):
    kill_build_and_check_the_remote_training_stops(cluster, ray_project(tmp_path / "p", cluster, fake="fake_seconds = 60\n"))


def test_ray_client_address_trains_and_a_killed_build_cancels(cluster, tmp_path):
    """``ray://`` (Ray Client), which cannot read streaming generators: the same log, result and cancellation."""
    local = make_project(tmp_path / "local")
    build(local, f"train:bbo/{VARIANT}")
    root = ray_project(tmp_path / "p", cluster, address=cluster.client_address)
    out = charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (vdir(root, "bbo") / "raw.safetensors").read_bytes() == (vdir(local, "bbo") / "raw.safetensors").read_bytes()
    log = (vdir(root, "bbo") / "train.log").read_text(encoding="utf-8")
    assert "running on node" in log and "fake trainer: wrote" in log
    kill_build_and_check_the_remote_training_stops(
        cluster, ray_project(tmp_path / "slow", cluster, address=cluster.client_address, fake="fake_seconds = 60\n"))


def test_an_unreachable_cluster_fails_at_once_naming_the_address(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = make_project(tmp_path / "p", project_extra=f'executor = "ray"\nray_address = "127.0.0.1:{port}"\n[trainer.extra]\n')
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", f"train:bbo/{VARIANT}", "--root", str(root)],
                         capture_output=True, text=True, timeout=left(120))
    assert out.returncode != 0
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in out.stdout + out.stderr, out.stdout + out.stderr
    assert time.monotonic() - t0 < 60  # not Ray's minutes of retrying
    assert not (vdir(root, "bbo") / "raw.safetensors").exists()


def test_a_driver_whose_cluster_went_away_fails_the_next_training_at_once_and_exits(tmp_path):
    """Not Ray's ~60 s of waiting for its GCS: the driver checks the address before each training."""
    own = LocalCluster(head_gpus=1, head_cpus=1, workers=())
    try:
        root = ray_project(tmp_path / "p", own)
        out = charbuild(own, root, "build", f"train:bbo/{VARIANT}", idle=300)
        assert out.returncode == 0, out.stdout + out.stderr
        pid = json.loads(driver_file(root).read_text(encoding="utf-8"))["pid"]
    finally:
        own.stop()
    t0 = time.monotonic()
    out = charbuild(own, root, "build", f"train:alc/{VARIANT}", idle=300)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert f"cannot reach the Ray cluster at '{own.address}'" in said and "went away while" in said, said
    assert time.monotonic() - t0 < 40
    assert gone(pid, timeout=left(20)), "the driver stayed after its cluster went away"
    assert not driver_file(root).exists()
    assert not (vdir(root, "alc") / "raw.safetensors").exists()


def test_dry_run_says_where_each_training_would_run(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster)
    out = charbuild(cluster, root, "train", "--dry-run", "bbo")
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("# executor ray"))
    assert "GPU = 1" in line and cluster.address in line and "Ray picks one of:" in line
    assert line.count("(GPU 1)") == 2  # both nodes fit


def test_a_failing_trainer_fails_the_target_with_node_and_log_and_is_not_retried(cluster, tmp_path):
    root = ray_project(tmp_path / "p", cluster, trainer="retries = 2\n", fake="fake_fail = true\n")
    out = charbuild(cluster, root, "build", f"train:bbo/{VARIANT}")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "failed (exit status 1)" in text, text
    assert re.search(r"the trainer on node \S+ \(.*worker pid \d+\) exited with status 1", text), text
    assert "failing as asked" in text and "attempt 2/3" not in text
    assert not (vdir(root, "bbo") / "raw.safetensors").exists()
