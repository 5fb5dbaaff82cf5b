"""The SDXL example project of docs/sdxl.md passes `charbuild check`, and gets the SDXL defaults."""

from __future__ import annotations

import re
from pathlib import Path

from charbuild.block_weights import resolve_merge_weights
from charbuild.config import load_project

from checkpoint_files import write_layout_checkpoint
from conftest import REPO, make_project

FAKE_SD = REPO / "tests" / "fake_sd_scripts"


def docs_project_toml() -> str:
    text = (REPO / "docs" / "sdxl.md").read_text(encoding="utf-8")
    section = text[text.index("## `characters/project.toml`"):]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def _check(capsys, root: Path) -> tuple[int, str]:
    from charbuild.cli import main

    try:
        main(["check", "--root", str(root)])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_docs_sdxl_project_passes_check(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    toml = docs_project_toml()
    assert 'sd_scripts = "C:/tools/sd-scripts"' in toml and "arch =" not in toml.replace("# arch =", "")
    toml = toml.replace("C:/tools/sd-scripts", FAKE_SD.as_posix())  # a folder with sdxl_train_network.py
    (root / "characters" / "project.toml").write_text(toml, encoding="utf-8")
    write_layout_checkpoint(root / "models" / "illustriousXL_v01.safetensors", "sdxl")
    code, out = _check(capsys, root)
    assert code == 0 and out.startswith("ok: 2 character(s)"), out
    p = load_project(root)
    assert p.model["arch"] == "sdxl"  # read from the file
    assert p.dataset["sizes"] == [256, 384, 512, 768, 1024, 1536]
    assert list(resolve_merge_weights("FACE", p).values())[:6] == [0, 1, 1, 1, 1, 1]
    assert len(resolve_merge_weights("XL_SOFT", p)) == 20
    # the same file said to be SD1.5 is an error naming the file
    (root / "characters" / "project.toml").write_text(toml.replace("# arch = \"sdxl\"", 'arch = "sd15"'), encoding="utf-8")
    code, out = _check(capsys, root)
    assert code == 2 and "'model.arch' = 'sd15' but models/illustriousXL_v01.safetensors is an SDXL model" in out, out
