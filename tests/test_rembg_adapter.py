"""The ``model`` method through a faithful double of rembg's session interface.

The real model (an ONNX file of ~170 MB) cannot be in CI, nor downloaded. The double keeps
the contract charbuild relies on, as rembg's ``DisCustomSession``/``U2netCustomSession`` have
it: ``rembg.new_session(name, model_path=...)`` (a missing ``model_path`` is a ValueError),
``session.predict(image)`` returning a list with one ``L`` mask of the picture's size, made
at the model's 1024 px input and resized back with LANCZOS, normalised to 0..255. Its
"segmentation" is a soft threshold of the distance to the corner colour. Everything around
it (the adapter, the un-mixing, the mask stage, the config checks) is the real code.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageDraw

from charbuild import rembg_adapter
from charbuild.config import load_project
from charbuild.errors import CharbuildError
from graphtools import build, groups
from flatten_fixtures import flatten_project, set_flatten


class FakeSession:
    def __init__(self, name, model_path):
        self.name, self.model_path, self.calls = name, model_path, 0

    def predict(self, img, *args, **kwargs):
        self.calls += 1
        big = np.asarray(img.convert("RGB").resize((1024, 1024), Image.Resampling.BILINEAR), np.float32)
        dist = np.linalg.norm(big - big[0, 0], axis=-1)
        pred = np.clip((dist - 10) / 30, 0, 1)
        pred = (pred - pred.min()) / max(pred.max() - pred.min(), 1e-6)
        mask = Image.fromarray((pred * 255).astype("uint8"), mode="L")
        return [mask.resize(img.size, Image.Resampling.LANCZOS)]


@pytest.fixture
def fake_rembg(monkeypatch):
    module = types.ModuleType("rembg")
    module.__spec__ = importlib.machinery.ModuleSpec("rembg", None)
    made = []

    def new_session(model_name="u2net", *args, **kwargs):
        if model_name in ("dis_custom", "u2net_custom") and kwargs.get("model_path") is None:
            raise ValueError("model_path is required")
        session = FakeSession(model_name, kwargs.get("model_path"))
        made.append(session)
        return session

    module.new_session = new_session
    module.sessions = types.SimpleNamespace(sessions_class=[
        type(n, (), {"name": classmethod(lambda cls, n=n: n)}) for n in ("u2net", "dis_custom", "u2net_custom")])
    monkeypatch.setitem(sys.modules, "rembg", module)
    monkeypatch.setattr(rembg_adapter, "_SESSIONS", {})
    return made


def test_session_kind_from_the_file_name():
    assert rembg_adapter.session_name("/m/isnet-anime.onnx") == "dis_custom"
    assert rembg_adapter.session_name("C:/models/u2net.onnx") == "u2net_custom"


def test_model_cut_out_unmixes_the_soft_edge(fake_rembg, tmp_path):
    model = tmp_path / "isnet-anime.onnx"
    model.write_bytes(b"weights")
    big = Image.new("RGB", (480, 480), (230, 230, 230))
    ImageDraw.Draw(big).ellipse([100, 100, 380, 380], fill=(40, 40, 160))
    img = big.resize((120, 120), Image.Resampling.BOX)  # an antialiased edge
    rgba, verdict = rembg_adapter.cut_out_with_model(img, str(model))
    assert fake_rembg[0].name == "dis_custom" and fake_rembg[0].model_path == str(model)
    assert verdict["sure"] and verdict["session"] == "dis_custom" and 0.2 < verdict["stats"]["figure"] < 0.35
    a = np.asarray(rgba, np.float32)
    assert a[0, 0, 3] == 0 and a[60, 60, 3] == 255
    # composited on black, partial edge pixels carry no grey of the old background
    on_black = a[..., :3] * a[..., 3:] / 255
    edge = (a[..., 3] > 20) & (a[..., 3] < 235)
    assert edge.any() and (on_black[edge][:, 0] <= on_black[edge][:, 2] + 2).all()  # bluish, not grey
    rembg_adapter.cut_out_with_model(img, str(model))
    assert len(fake_rembg) == 1  # one session per model file and process


def test_an_old_rembg_without_custom_sessions_is_refused(fake_rembg, tmp_path):
    sys.modules["rembg"].sessions.sessions_class = sys.modules["rembg"].sessions.sessions_class[:1]
    model = tmp_path / "isnet-anime.onnx"
    model.write_bytes(b"weights")
    with pytest.raises(CharbuildError, match="no 'dis_custom' session"):
        rembg_adapter.cut_out_with_model(Image.new("RGB", (8, 8)), str(model))
    assert fake_rembg == []  # never a session that would download a model


def test_missing_extra_or_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rembg", None)  # import rembg raises ImportError
    monkeypatch.setattr(rembg_adapter, "_SESSIONS", {})
    img = Image.new("RGB", (8, 8))
    with pytest.raises(CharbuildError, match=r"pip install 'charbuild\[rembg\]'"):
        rembg_adapter.cut_out_with_model(img, str(tmp_path / "m.onnx"))
    with pytest.raises(CharbuildError, match="needs model"):
        rembg_adapter.cut_out_with_model(img, None)


def test_model_method_builds_masks(fake_rembg, tmp_path):
    model = tmp_path / "isnet-anime.onnx"
    model.write_bytes(b"weights")
    root = flatten_project(tmp_path)
    set_flatten(root, f'[flatten]\nmethod = "model"\nmodel = "{model.as_posix()}"\n')
    assert load_project(root).characters["alice"].flatten.rule.model == str(model.resolve())
    ran = groups(build(root, "image"))
    # method "model" also covers alice's RGBA picture, which keeps its own alpha
    assert ran["mask"] == {"alice/face/f00", "alice/face/f01", "alice/face/f02", "alice/dress/b00", "alice/dress/b01"}
    verdicts = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in (root / "build/images/alice/face/mask").glob("*.json")}
    assert verdicts["f00"]["method"] == "model" and verdicts["f02"]["method"] == "alpha"
    prepared = np.asarray(Image.open(root / "build/images/alice/face/96/f00.png"))
    assert tuple(prepared[2, 2]) == (0, 0, 0) and abs(int(prepared[30, 48, 0]) - 200) < 4
    # a changed model file (size, mtime) rebuilds the masks
    model.write_bytes(b"other weights")
    assert groups(build(root, "image"))["mask"] == ran["mask"]
