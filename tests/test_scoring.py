"""Which training pictures a LoRA's samples are scored against, and the prompts without trigger words (pure)."""

from pathlib import Path

from charbuild.sample_prompts import sample_set
from charbuild.train.scoring import (NOTRIGGER_DIR, files_by_name, identity_line, member_of, references,
                                     trigger_line, without_triggers)


def _job(kind: str, inputs: list[str]):
    class J:  # only the fields references() reads
        pass

    j = J()
    j.kind, j.inputs = kind, tuple(inputs)
    return j


def test_references_per_member_largest_size_and_the_kind_s_codes():
    img = "/p/build/images"
    inputs = [f"{img}/kuro/face/128/f00.png", f"{img}/kuro/face/128/f00.txt", f"{img}/kuro/face/256/f00.png",
              f"{img}/kuro/school/256/b00.png", f"{img}/kuro/school/256/b01.png",
              f"{img}/cha/suit/128/b00.png", f"{img}/cha/suit/128/b00-extra.png", "/p/lora.safetensors"]
    body = references(_job("group", inputs))
    assert {m: sorted(c) for m, c in body.items()} == {"cha/suit": ["b00"], "kuro/school": ["b00", "b01"]}
    assert body["kuro/school"]["b00"] == Path(f"{img}/kuro/school/256/b00.png")
    face = references(_job("face", inputs))
    assert face == {"kuro/face": {"f00": Path(f"{img}/kuro/face/256/f00.png")}}
    assert member_of(Path("a/b/c.png")) is None


def test_without_triggers_keeps_seeds_and_the_rest_of_the_prompt():
    samples = sample_set("body", ["krnksf", "krnk"], extra=["krnk, smile"])
    out = without_triggers(samples, ["krnksf", "krnk"])
    assert len(out) == 15 and all(s.name.startswith(NOTRIGGER_DIR + "/") for s in out)  # user prompts are not scored
    assert [s.index for s in out] == [s.index for s in samples[:15]]
    assert out[0].prompt == samples[0].prompt.removeprefix("krnksf, krnk, ")
    assert "krnk" not in out[0].prompt.split(", ")


def test_the_summary_line_shows_identity_before_and_after(tmp_path):
    import json

    from charbuild.report.summary import identity_text

    log = tmp_path / "metrics.jsonl"
    assert identity_text(log) == ""  # no log
    lines = [{"step": 0, "identity": {"kuro/school": 0.5, "cha/suit": 0.4}}, {"step": 1, "loss": 0.1},
             {"step": 40, "identity": {"kuro/school": 0.2, "cha/suit": 0.3}}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert identity_text(log) == "  identity cha/suit 0.400 → 0.300 (-25 %), kuro/school 0.500 → 0.200 (-60 %)"
    log.write_text('{"step": 1, "loss": 0.1}\n', encoding="utf-8")
    assert identity_text(log) == ""


def _figure(path: Path, colour) -> Path:
    from PIL import Image

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste(colour, (20, 12, 44, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_a_group_s_members_are_scored_on_their_own_samples_and_plain_codes_on_every_member(tmp_path):
    """A group's ``<member>/<code>`` samples are scored against that member's pictures only; a
    plain ``<code>`` sample (a face or body LoRA, or a group sampled before per-member prompts)
    against every member's."""
    refs = {"kuro/school": {"b00": _figure(tmp_path / "ref/kuro/b00.png", (0, 0, 0))},
            "cha/suit": {"b00": _figure(tmp_path / "ref/cha/b00.png", (200, 30, 30))}}
    step = tmp_path / "samples/80"
    written = [_figure(step / "kuro/school/b00.png", (0, 0, 0)), _figure(step / "cha/suit/b00.png", (200, 30, 30)),
               _figure(step / "notrigger/kuro/school/b00.png", (0, 0, 0)), _figure(step / "p1.png", (0, 0, 0))]
    named = files_by_name(written, step)
    assert sorted(named) == ["cha/suit/b00", "kuro/school/b00", "notrigger/kuro/school/b00"]  # p1 is no code
    line = identity_line(80, named, refs)
    assert line["identity"] == {"cha/suit": 0.0, "kuro/school": 0.0}  # each its own figure
    swapped = {"kuro/school/b00": named["cha/suit/b00"], "cha/suit/b00": named["kuro/school/b00"]}
    assert min(identity_line(80, swapped, refs)["identity"].values()) > 0.3  # the other member's figure is far
    plain = identity_line(80, {"b00": named["kuro/school/b00"]}, refs)["identity"]
    assert plain["kuro/school"] == 0.0 and plain["cha/suit"] > 0.3
    base = files_by_name([_figure(tmp_path / "s0/notrigger/kuro/school/b00.png", (0, 0, 0))], tmp_path / "s0")
    assert trigger_line(80, named, base) == {"step": 80, "trigger": 0.0}  # matched by name, member and all


def test_a_group_s_prompts_without_triggers_keep_each_member_s_seeds():
    members = [("kuro/school", ["krnksf", "krnk"]), ("cha/suit", ["tyankps", "tyank"])]
    samples = sample_set("group", ["krnksf", "tyankps", "krnk", "tyank"], members=members)
    out = without_triggers(samples, ["krnksf", "tyankps", "krnk", "tyank"])
    assert len(out) == 30 and out[15].name == f"{NOTRIGGER_DIR}/cha/suit/b00" and out[15].index == 15
    assert out[0].prompt == out[15].prompt and not {"krnk", "tyank"} & set(out[15].prompt.split(", "))
