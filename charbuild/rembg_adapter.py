"""The ``model`` method: a segmentation model run through rembg (the ``rembg`` extra).

The model is a file the user gives (``[flatten] model = "…/isnet-anime.onnx"``); charbuild
never downloads one. rembg's custom sessions take such a file: ``dis_custom`` for the DIS
family (isnet-anime, isnet-general-use) and ``u2net_custom`` for U²-Net models; the file
name picks one (``isnet``/``dis`` in it: DIS). The session's ``predict(image)`` gives the
mask (a list with one ``L`` image); the figure's colour is then un-mixed from the nearby
background where the mask is partial (:func:`charbuild.background.unmix`), so a model's soft
hair edge leaves no halo either.

Sessions are made once per process and model file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .background import unmix
from .errors import CharbuildError
from .flatten_settings import REMBG_HINT

_SESSIONS: dict[str, object] = {}


def session_name(model: str | Path) -> str:
    """rembg's custom session for the model file: ``dis_custom`` or ``u2net_custom``."""
    stem = Path(model).name.lower()
    return "dis_custom" if ("isnet" in stem or "dis" in stem) else "u2net_custom"


def _session(model: str):
    if model not in _SESSIONS:
        try:
            import rembg
        except ImportError:
            raise CharbuildError(f"method = \"model\" needs the rembg extra: {REMBG_HINT}") from None
        if not Path(model).is_file():
            raise CharbuildError(f"the model file {model} does not exist (charbuild never downloads one)", path=model)
        name = session_name(model)
        # new_session falls back to (and downloads) u2net for a name it does not know: never that
        known = {cls.name() for cls in getattr(getattr(rembg, "sessions", None), "sessions_class", ())}
        if name not in known:
            raise CharbuildError(f"this rembg has no {name!r} session (for a model file you give): "
                                 "upgrade it: pip install -U 'charbuild[rembg]'")
        try:
            _SESSIONS[model] = rembg.new_session(name, model_path=model)
        except Exception as exc:  # onnxruntime's errors for a file that is no model of that kind
            raise CharbuildError(f"rembg could not load the model ({type(exc).__name__}: {exc}); is it an "
                                 f"{'isnet/DIS' if session_name(model) == 'dis_custom' else 'U²-Net'} ONNX file?",
                                 path=model) from None
    return _SESSIONS[model]


def cut_out_with_model(rgb: Image.Image, model: str | None) -> tuple[Image.Image, dict]:
    """The cut-out (RGBA) of an RGB picture by the model, and its verdict (always sure)."""
    if not model:
        raise CharbuildError("method = \"model\" needs model = \"path/to/model.onnx\" in [flatten]")
    masks = _session(model).predict(rgb)
    if not masks:
        raise CharbuildError("the model gave no mask", path=model)
    mask = masks[0].convert("L")
    if mask.size != rgb.size:
        mask = mask.resize(rgb.size, Image.Resampling.LANCZOS)
    alpha = np.asarray(mask)
    rgba = unmix(np.asarray(rgb), alpha)
    figure = float((alpha >= 128).mean())
    return Image.fromarray(rgba, "RGBA"), {"sure": True, "reasons": [], "stats": {"figure": round(figure, 4)},
                                           "session": session_name(model)}
