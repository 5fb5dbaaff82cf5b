"""What a build prints: one line per picture, nothing per up-to-date task, a line when there is
nothing to do, and where a training runs in true words."""

from __future__ import annotations

import io

from conftest import make_project

from charbuild.dodo import run_doit


def _build(root, capsys, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = run_doit(root, ["run", *args], extra_config={"outfile": out})
    captured = capsys.readouterr()
    return code, out.getvalue() + captured.out + captured.err


def test_a_picture_is_one_line_and_a_no_op_build_says_nothing_to_do(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    code, text = _build(root, capsys, "image", "caption")
    assert code == 0
    pictures = [line for line in text.splitlines() if "image:alice/face/f00@64" in line or "alice/face/64/f00.png" in line]
    assert pictures == ["charbuild: picture 1/14: build/images/alice/face/64/f00.png (64x64)"], pictures
    assert ".  caption:alice/face/f00@64" in text  # other tasks keep doit's line
    code, text = _build(root, capsys, "image", "caption")
    assert code == 0
    assert not [line for line in text.splitlines() if line.startswith("--")], text
    assert "nothing to do: everything is up to date (28 task(s) checked)\n" in text, text


def test_the_training_line_says_cpu_where_there_is_no_gpu(tmp_path, capsys, monkeypatch):
    from charbuild.train import hardware

    root = make_project(tmp_path / "p", project_extra="run_cache = false\n[trainer.extra]\nfake_seconds = 0\n")
    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: False)
    code, text = _build(root, capsys, "train:bbo/Lora1x1A1-AdamW8")
    assert code == 0 and "training bbo/Lora1x1A1-AdamW8 on the CPU (no GPU found) (fake)" in text, text
    assert "on GPU 0" not in text
    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: True)
    (root / "build/loras/bbo/Lora1x1A1-AdamW8/raw.safetensors").unlink()
    code, text = _build(root, capsys, "train:bbo/Lora1x1A1-AdamW8")
    assert code == 0 and "training bbo/Lora1x1A1-AdamW8 on GPU 0 (fake)" in text, text


def test_has_cuda_gpu_respects_a_hidden_device_list(monkeypatch):
    from charbuild.train.hardware import has_cuda_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert has_cuda_gpu() is False
