"""Which training pictures a LoRA's samples are scored against, and the prompts without trigger words (pure)."""

from pathlib import Path

from charbuild.sample_prompts import sample_set
from charbuild.train.scoring import NOTRIGGER_DIR, member_of, references, without_triggers


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
