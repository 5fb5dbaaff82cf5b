"""The README's set-up is what CI runs first: a new user who pastes it gets a passing suite."""

from __future__ import annotations

import re

from conftest import EXTRAS, REPO


def _readme_block(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1]
    block = section.split("```\n", 2)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip().startswith(("python -m", "pip "))]


def test_the_readme_gives_a_cpu_and_a_gpu_install_line_each_building_the_example():
    install = _readme_block("Install and build")
    cpu = next(line for line in install if "whl/cpu" in line)
    gpu = next(line for line in install if ".[test,gpu]" in line)
    assert cpu.index("pip install torch") < cpu.index('pip install -e ".[test]"')  # CPU torch before the package
    assert cpu.endswith("&& doit") and gpu.endswith("&& doit")
    assert _readme_block("Tests") == ["python -m pytest -q"]


def test_ci_runs_the_readme_install_and_test_command_before_installing_any_extra():
    ci = _ci_commands()
    install_test = ci.index('python -m pip install --quiet -e ".[test]"')
    readme_run = ci.index("python -m pytest -q")
    extras_install = ci.index('python -m pip install --quiet -e ".[ray]"')
    assert install_test < readme_run < extras_install
    assert not any(re.search(r"\.\[[^]]*(ray|gpu)", c) for c in ci[:readme_run]), ci
    assert ci[-1] == "python -m pytest -q -m extras"  # then the tests that need the extras
    assert set(EXTRAS) == {"ray", "chromium"}  # each installed by .ci/run's third step


def test_the_readme_gives_the_built_in_presets_as_the_code_has_them():
    from charbuild.lora.blocks import BUILTIN_PRESETS

    text = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("FACE", "BODY"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` | `"))
        values = [float(v) for v in row.split("`")[3].split(",")]
        assert values == list(BUILTIN_PRESETS[name]), name
    assert "every block it does not name to 1" in text
