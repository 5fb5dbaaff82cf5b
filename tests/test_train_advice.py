"""`charbuild check` says why a setting leaves the safe GPU path or is ignored by the chosen backend."""

from __future__ import annotations

from conftest import make_project

from charbuild.config import load_project
from charbuild.train.advice import settings_warnings


def test_unsafe_sdxl_vae_and_ignored_settings():
    sdxl, builtin = {"arch": "sdxl", "vae": None}, {"backend": "builtin"}
    assert settings_warnings(sdxl, builtin, {}) == []
    [(message, keypath)] = settings_warnings(sdxl, builtin, {"no_half_vae": False})
    assert "overflows" in message and "zeros" in message and keypath == ("training", "no_half_vae")
    assert settings_warnings({"arch": "sdxl", "vae": "fixed.safetensors"}, builtin, {"no_half_vae": False}) == []
    assert settings_warnings({"arch": "sd15"}, builtin, {"no_half_vae": False}) == []
    keys = [kp for _, kp in settings_warnings({"arch": "sd15"}, {"backend": "builtin", "xformers": True},
                                              {"data_loader_workers": 2})]
    assert keys == [("trainer", "xformers"), ("training", "data_loader_workers")]
    assert settings_warnings({"arch": "sd15"}, {"backend": "sd-scripts", "xformers": True}, {"data_loader_workers": 2}) == []
    [(message, _)] = settings_warnings({"arch": "sd15"}, {"backend": "sd-scripts"}, {"save_every": 100})
    assert "--save_every_n_steps" in message


def test_check_shows_them_at_their_lines(tmp_path):
    make_project(tmp_path, project_extra="xformers = true\n")  # appended to [trainer]
    text = (tmp_path / "characters" / "project.toml").read_text(encoding="utf-8")
    (tmp_path / "characters" / "project.toml").write_text(
        text.replace('backend = "fake"', 'backend = "builtin"').replace("dim = 4\n", "dim = 4\ndata_loader_workers = 0\n"),
        encoding="utf-8")
    lines = (tmp_path / "characters" / "project.toml").read_text(encoding="utf-8").splitlines()
    warnings = [w for w in load_project(tmp_path).warnings if "ignored by the builtin" in w.message]
    assert [(w.severity, lines[w.line - 1].split(" =")[0]) for w in warnings] == [
        ("warning", "xformers"), ("warning", "data_loader_workers")]
