"""The charbuild command line, through its one error handler (`charbuild.cli.main`)."""

from __future__ import annotations

import json

from checkpoint_files import write_layout_checkpoint
from conftest import REPO, draw_picture, make_project, run_cli as run


def test_check_ok_and_errors(project, capsys):
    code, out, err = run(capsys, "check", "--root", str(project))
    assert code == 0 and out.startswith("ok: 2 character(s), 7 picture(s), 3 LoRA(s)")
    assert "warning: angle codes missing" in err
    toml = project / "characters/bob/character.toml"
    toml.write_text('keyword = "bbo"\nbackgrund = "black"\n', encoding="utf-8")
    (project / "characters/bob/face/f03.png").write_bytes(b"\x89PNG broken")
    code, out, err = run(capsys, "check", "--root", str(project))
    assert code == 2
    assert "characters/bob/character.toml:2: error: unknown key 'backgrund' in the top level; did you mean 'background'?" in err
    assert "characters/bob/face/f03.png: error:" in err


def test_new_scaffolds_and_never_overwrites(project, capsys):
    code, out, _ = run(capsys, "new", "黒猫", "--keyword", "krnk", "--outfit", "school", "--root", str(project))
    assert code == 0 and "created characters/黒猫/character.toml" in out
    toml = project / "characters/黒猫/character.toml"
    text = toml.read_text(encoding="utf-8")
    assert 'keyword = "krnk"' in text and "[outfits.school]" in text
    assert (project / "characters/黒猫/outfits/school").is_dir()
    toml.write_text(text + "# mine\n", encoding="utf-8")
    code, _, err = run(capsys, "new", "黒猫", "--root", str(project))
    assert code == 1 and "already exists" in err
    assert toml.read_text(encoding="utf-8").endswith("# mine\n")
    # the scaffold is a valid character once it has pictures
    draw_picture(project / "characters/黒猫/face/f00.png", "f00")
    draw_picture(project / "characters/黒猫/outfits/school/b00.png", "b00")
    code, out, err = run(capsys, "check", "--root", str(project))
    assert code == 0, err


def test_tags_captions_a_folder_in_place(tmp_path, capsys):
    folder = tmp_path / "kuronekomimi girl, shorthair_f0768"
    draw_picture(folder / "f00.png", "f00")
    draw_picture(folder / "notes.png", "f00")
    code, out, _ = run(capsys, "tags", str(folder))
    assert code == 0
    assert (folder / "f00.txt").read_text(encoding="utf-8").startswith(
        "kuronekomimi, shorthair, white background, black background, simple background, from horizontal")
    assert out.splitlines() == [
        f"{folder / 'notes.png'}: skipped: file name does not start with an image code [fb][0-2][0-7] "
        "(e.g. f00.png); rename it to caption it",
        f"{folder}: 1 caption(s) written, 0 unchanged, 1 skipped (keywords: kuronekomimi, shorthair)",
    ]
    assert not (folder / "notes.txt").exists()


def test_status_build_and_inspect(project, capsys):
    code, out, _ = run(capsys, "status", "--root", str(project))
    assert code == 0 and "image: 14 to build" in out and "not built yet" in out
    code, out, err = run(capsys, "build", "--root", str(project))
    assert code == 0, out + err
    code, out, _ = run(capsys, "status", "--root", str(project))
    assert out.strip() == "everything is up to date"
    proj = project / "characters/project.toml"
    proj.write_text(proj.read_text(encoding="utf-8") + "[compress]\nsv_ratio = 4\n", encoding="utf-8")
    code, out, _ = run(capsys, "status", "--root", str(project))
    assert "compress: 3 to build" in out and "train" not in out
    final = project / "build/loras/alc/Lora1x1A1-AdamW8/alc-Lora1x1A1-AdamW8.safetensors"
    code, out, _ = run(capsys, "inspect", "--json", str(final))
    info = json.loads(out)
    assert info["format"] == "lora" and info["arch"] == "sd15"


def test_build_for_one_picture(project, capsys):
    run(capsys, "build", "--root", str(project), "image", "caption", "dataset", "preview")
    picture = project / "characters/bob/face/f03.png"
    draw_picture(picture, "f03", seed=5)
    code, out, err = run(capsys, "build", "--root", str(project), "--for", str(picture))
    assert code == 0, err
    ran = [line[3:] for line in out.splitlines() if line.startswith(".  ")]
    pictures = [line.split(": ")[2].split(" (")[0] for line in err.splitlines() if line.startswith("charbuild: picture ")]
    assert ran == ["preview:bbo"]  # a picture says itself once, in its own line
    assert sorted(pictures) == ["build/images/bob/face/64/f03.png", "build/images/bob/face/96/f03.png"]


def test_train_dry_run_prints_commands(project, capsys):
    code, out, err = run(capsys, "train", "--dry-run", "--root", str(project), "alc")
    assert code == 0, err
    assert out.startswith("# train:alc/Lora1x1A1-AdamW8")
    assert "charbuild.train.fake_trainer" in out


def test_train_dry_run_sd_scripts_command(tmp_path, capsys):
    root = make_project(tmp_path / "p", project_extra="")
    proj = root / "characters/project.toml"
    fake = REPO / "tests/fake_sd_scripts"
    write_layout_checkpoint(root / "model.safetensors", "sd15")  # the config reads its architecture
    text = proj.read_text(encoding="utf-8").replace('backend = "fake"', f'backend = "sd-scripts"\nsd_scripts = "{fake.as_posix()}"')
    proj.write_text('[model]\nbase = "model.safetensors"\n' + text, encoding="utf-8")
    code, out, err = run(capsys, "train", "--dry-run", "--root", str(root), "alc")
    assert code == 0, err
    assert "accelerate launch" in out and "train_network.py" in out
    assert "--network_module=networks.lora" in out and "--max_train_steps=5" in out


def test_unknown_lora_is_a_clear_error(project, capsys):
    code, _, err = run(capsys, "train", "--dry-run", "--root", str(project), "nobody")
    assert code == 1 and "no LoRA named nobody" in err


def test_a_second_build_is_refused_while_one_runs(project, capsys):
    from charbuild.buildlock import build_lock

    with build_lock(project / "build"):
        code, _, err = run(capsys, "build", "--root", str(project), "image")
    assert code == 3 and "another build of this project is running" in err


def test_new_scaffolds_steps_that_suit_the_project_s_model(project, capsys):
    """The demo model learns in a few dozen steps (minutes on a CPU); a real model gets the original's."""
    code, _, _ = run(capsys, "new", "carol", "--outfit", "casual", "--root", str(project))
    text = (project / "characters/carol/character.toml").read_text(encoding="utf-8")
    assert code == 0 and text.endswith("\n") and not text.endswith("\n\n")
    assert text.count("steps = 40") == 2 and "the built-in 'tiny' model needs few; a real model: 1000" in text
    toml = project / "characters/project.toml"
    toml.write_text('[model]\nbase = "models/real.safetensors"\n' + toml.read_text(encoding="utf-8"), encoding="utf-8")
    code, _, _ = run(capsys, "new", "dave", "--outfit", "casual", "--root", str(project))
    text = (project / "characters/dave/character.toml").read_text(encoding="utf-8")
    assert code == 0 and "steps = 1000" in text and "steps = 1200" in text and "a real SD1.5/SDXL model" in text


def test_every_project_command_explains_root(capsys):
    from charbuild.cli import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if param.name == "root":
                assert param.help and "characters/" in param.help, name


def test_status_says_each_thing_once_in_plain_words(project, capsys):
    code, _, err = run(capsys, "build", "--root", str(project))
    assert code == 0, err
    draw_picture(project / "characters/bob/face/f00.png", "f00", seed=9)  # changed
    draw_picture(project / "characters/bob/face/f01.png", "f01", seed=4)  # new
    code, out, _ = run(capsys, "status", "--all", "--root", str(project))
    assert code == 0
    assert "report: report:" not in out and "\n  report: " in out, out
    report_line = next(line for line in out.splitlines() if line.startswith("  report: "))
    assert "changed: characters/bob/face/f00.png;" in report_line  # f01 only as a new input
    assert report_line.endswith("new input: characters/bob/face/f01.png"), report_line
    assert "error while checking" not in out and "waits for inputs that are not built yet: build/images/" in out
    assert "_prune" not in out


def test_sd_scripts_lycoris_trainings_sign_the_module_choice_charbuild_gives_lycoris(tmp_path):
    """A Locon/Loha trained through sd-scripts before LyCORIS was given kohya's modules adapted
    more of them (or failed): its signature differs, so it trains again; LoRA variants are unchanged."""
    from charbuild.config import load_project
    from charbuild.tasks import Graph

    root = make_project(tmp_path / "p")
    proj = root / "characters/project.toml"
    write_layout_checkpoint(root / "model.safetensors", "sd15")
    text = proj.read_text(encoding="utf-8").replace(
        'backend = "fake"', f'backend = "sd-scripts"\nsd_scripts = "{(REPO / "tests/fake_sd_scripts").as_posix()}"')
    proj.write_text('[model]\nbase = "model.safetensors"\n' + text.replace(
        'variants = ["Lora1x1A1-AdamW8"]', 'variants = ["Lora1x1A1-AdamW8", "LoconA1-AdamW8"]'), encoding="utf-8")
    g = Graph(load_project(root))
    lora = g.project.loras["alc"]
    jobs = {p.name: g.train_job(lora, p) for p in g.variants(lora)}
    assert jobs["LoconA1-AdamW8"].signature_extra["lycoris_modules"] == "kohya"
    assert "lycoris_modules" not in jobs["Lora1x1A1-AdamW8"].signature_extra
