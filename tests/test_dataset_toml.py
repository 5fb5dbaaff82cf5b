"""Size classes, batch tables and the dataset TOML text (golden + tomllib round trip)."""

import tomllib

import pytest

from charbuild.dataset_toml import (
    BATCH_KEYS,
    BATCH_SIZE_TABLES,
    CLASS_RESOLUTION,
    MixedSizeClassError,
    Subset,
    dataset_semantics,
    folder_class,
    render_dataset_toml,
    size_class,
    toml_string,
)


@pytest.mark.parametrize(
    "px, cls",
    [(1, "LOW"), (128, "LOW"), (512, "LOW"), (513, "MID"), (768, "MID"), (769, "HIGH"), (1024, "HIGH"), (4096, "HIGH")],
)
def test_size_class_boundaries(px, cls):
    assert size_class(px) == cls


def test_class_resolution():
    assert CLASS_RESOLUTION == {"LOW": 512, "MID": 768, "HIGH": 1024}


def test_batch_keys_and_tables():
    assert BATCH_KEYS == (
        "LOW_LOW", "LOW_MID", "LOW_HIGH", "MID_LOW", "MID_MID", "MID_HIGH", "HIGH_LOW", "HIGH_MID", "HIGH_HIGH",
    )
    for table in BATCH_SIZE_TABLES.values():
        assert set(table) == set(BATCH_KEYS)
    assert BATCH_SIZE_TABLES["default"] == {k: (2 if k == "LOW_LOW" else 1) for k in BATCH_KEYS}
    twelve = {"LOW_LOW": 4, "MID_LOW": 3, "LOW_MID": 3, "MID_MID": 2, "HIGH_LOW": 2, "LOW_HIGH": 2}
    assert BATCH_SIZE_TABLES["12GB"] == {k: twelve.get(k, 1) for k in BATCH_KEYS}


def _sub(image_dir, *sizes, class_tokens="krnk girl", flip=True):
    return Subset(image_dir, class_tokens, flip, tuple(sizes))


@pytest.mark.parametrize(
    "sizes, cls",
    [
        (((512, 512), (512, 300)), ("LOW", "LOW")),
        (((513, 512),), ("MID", "LOW")),  # width and height classed separately
        (((512, 769),), ("LOW", "HIGH")),
        (((768, 768), (600, 700)), ("MID", "MID")),
        (((1024, 576),), ("HIGH", "MID")),
    ],
)
def test_folder_class(sizes, cls):
    assert folder_class(_sub("d", *sizes)) == cls


def test_mixed_size_classes_name_the_folder():
    with pytest.raises(MixedSizeClassError) as info:
        folder_class(_sub("build/images/krnk/face/768", (768, 768), (512, 512), (768, 768)))
    msg = str(info.value)
    assert "build/images/krnk/face/768" in msg
    assert "LOW_LOW (1 image)" in msg and "MID_MID (2 images)" in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(MixedSizeClassError):
        render_dataset_toml(1, [_sub("x", (512, 512), (513, 512))], BATCH_SIZE_TABLES["default"])


def test_empty_subset_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        folder_class(_sub("empty"))


GOLDEN = """\
[general]
color_aug = true
enable_bucket = true
bucket_no_upscale = true
caption_extension = '.txt'
num_repeats = 4

[[datasets]]
resolution = [512, 512]
batch_size = 4

[[datasets.subsets]]
image_dir = 'build/images/krnk/face/128'
class_tokens = 'krnk girl'
flip_aug = true

[[datasets.subsets]]
image_dir = 'build/images/krnk/face/512'
class_tokens = 'krnk girl'
flip_aug = true

[[datasets]]
resolution = [512, 768]
batch_size = 3

[[datasets.subsets]]
image_dir = 'build/images/krnk/school/768'
class_tokens = 'krnksf girl'
flip_aug = false

[[datasets]]
resolution = [768, 768]
batch_size = 2

[[datasets.subsets]]
image_dir = 'build/images/krnk/face/768'
class_tokens = 'krnk girl'
flip_aug = true

[[datasets]]
resolution = [1024, 768]
batch_size = 1

[[datasets.subsets]]
image_dir = 'build/images/krnk/wide/1024'
class_tokens = 'krnk girl'
flip_aug = true
"""


def _golden_subsets():
    # deliberately not in class order: datasets are sorted, subsets keep their order
    return [
        _sub("build/images/krnk/face/768", (768, 768), (700, 768)),
        _sub("build/images/krnk/wide/1024", (1024, 768)),
        _sub("build/images/krnk/face/128", (128, 128)),
        _sub("build/images/krnk/school/768", (384, 768), class_tokens="krnksf girl", flip=False),
        _sub("build/images/krnk/face/512", (512, 512), (400, 512)),
    ]


def test_golden_toml():
    assert render_dataset_toml(4, _golden_subsets(), BATCH_SIZE_TABLES["12GB"]) == GOLDEN


def test_output_is_byte_identical_for_identical_input():
    a = render_dataset_toml(4, _golden_subsets(), BATCH_SIZE_TABLES["12GB"])
    b = render_dataset_toml(4, list(_golden_subsets()), dict(BATCH_SIZE_TABLES["12GB"]))
    assert a.encode("utf-8") == b.encode("utf-8")


def test_round_trip_through_tomllib():
    data = tomllib.loads(GOLDEN)
    assert data["general"] == {
        "color_aug": True, "enable_bucket": True, "bucket_no_upscale": True,
        "caption_extension": ".txt", "num_repeats": 4,
    }
    assert [d["resolution"] for d in data["datasets"]] == [[512, 512], [512, 768], [768, 768], [1024, 768]]
    assert [s["image_dir"] for s in data["datasets"][0]["subsets"]] == ["build/images/krnk/face/128", "build/images/krnk/face/512"]


@pytest.mark.parametrize(
    "image_dir, tokens",
    [
        ("build/images/黒猫 ちゃん/face/512", "黒猫 girl"),
        ("it's a dir/with 'quotes'", 'say "hi"'),
        ("back\\slash\ttab", "line\nbreak\x01\x7f"),
    ],
)
def test_strings_round_trip(image_dir, tokens):
    text = render_dataset_toml(2, [_sub(image_dir, (512, 512), class_tokens=tokens)], BATCH_SIZE_TABLES["default"])
    sub = tomllib.loads(text)["datasets"][0]["subsets"][0]
    assert sub["image_dir"] == image_dir and sub["class_tokens"] == tokens
    assert tomllib.loads(f"v = {toml_string(image_dir)}")["v"] == image_dir


def test_japanese_path_is_written_readably():
    text = render_dataset_toml(1, [_sub("build/images/黒猫/face/512", (512, 512))], {})
    assert "image_dir = 'build/images/黒猫/face/512'" in text


def test_missing_batch_key_means_one_and_bad_input_is_refused():
    text = render_dataset_toml(1, [_sub("a", (512, 512))], {})
    assert "batch_size = 1" in text
    with pytest.raises(ValueError, match="num_repeats"):
        render_dataset_toml(0, [_sub("a", (512, 512))], {})
    with pytest.raises(ValueError, match="batch sizes"):
        render_dataset_toml(1, [_sub("a", (512, 512))], {"LOW_LOWW": 2})
    with pytest.raises(ValueError, match="batch sizes"):
        render_dataset_toml(1, [_sub("a", (512, 512))], {"LOW_LOW": 0})


def test_dataset_semantics_ignores_formatting():
    reformatted = GOLDEN.replace("enable_bucket = true", "enable_bucket  =  true").replace("'.txt'", '".txt"')
    assert reformatted != GOLDEN
    assert dataset_semantics(reformatted) == dataset_semantics(GOLDEN) == tomllib.loads(GOLDEN)


# --------------------------------------------------------------------------- SDXL

@pytest.mark.parametrize("px, cls", [(256, "LOW"), (1024, "LOW"), (1025, "MID"), (1536, "MID"), (1537, "HIGH")])
def test_sdxl_size_classes_are_sd15_scaled_by_two(px, cls):
    from charbuild.dataset_toml import class_resolution

    assert size_class(px, "sdxl") == cls
    assert class_resolution(cls, "sdxl") == 2 * CLASS_RESOLUTION[cls]


GOLDEN_SDXL = """\
[general]
enable_bucket = true
bucket_no_upscale = true
caption_extension = '.txt'
num_repeats = 2
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64

[[datasets]]
resolution = [1024, 1024]
batch_size = 2

[[datasets.subsets]]
image_dir = 'build/images/krnk/face/256'
class_tokens = 'krnk girl'
flip_aug = true

[[datasets.subsets]]
image_dir = 'build/images/krnk/face/1024'
class_tokens = 'krnk girl'
flip_aug = true

[[datasets]]
resolution = [1024, 1536]
batch_size = 1

[[datasets.subsets]]
image_dir = 'build/images/krnk/school/1536'
class_tokens = 'krnksf girl'
flip_aug = false
"""


def test_sdxl_dataset_toml_golden():
    from charbuild.dataset_toml import SDXL_BATCH_SIZE_TABLES

    subsets = [
        _sub("build/images/krnk/face/256", (256, 256)),
        _sub("build/images/krnk/face/1024", (1024, 1024), (1024, 900)),
        _sub("build/images/krnk/school/1536", (1024, 1536), class_tokens="krnksf girl", flip=False),
    ]
    assert render_dataset_toml(2, subsets, SDXL_BATCH_SIZE_TABLES["24GB"], arch="sdxl") == GOLDEN_SDXL
    # the same pictures as an SD1.5 project: the original's classes and no bucket lines
    sd15 = render_dataset_toml(2, subsets, BATCH_SIZE_TABLES["default"])
    assert "max_bucket_reso" not in sd15 and "resolution = [1024, 1024]" in sd15 and "resolution = [1024, 1024]\nbatch_size = 1" in sd15
    # color_aug: the original's on SD1.5; not on SDXL, so that sd-scripts can cache its latents
    assert "color_aug = true" in sd15 and "color_aug" not in GOLDEN_SDXL


def test_sdxl_mixed_classes_message_names_sdxl_limits():
    with pytest.raises(MixedSizeClassError, match="<= 1024 LOW, <= 1536 MID"):
        folder_class(_sub("x", (1024, 1024), (1025, 1024)), "sdxl")
    with pytest.raises(ValueError, match="unknown arch 'sd3'"):
        size_class(64, "sd3")
