"""The contract end to end, through the real command line: `python -m sdbatch ...` in a fresh folder."""

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from conftest import REPO, cli, read_ledgers, write_manifest
from sdbatch import SdbatchError
from sdbatch.manifest import derive_seed
from sdbatch.run import run

CONTRACT_COLUMNS = ("id", "image_index", "seed", "prompt", "image_path", "status", "attention_backend", "shard",
                    "worker_index", "num_workers", "device")
STAGE_COLUMNS = ("text_encode_s", "denoise_s", "vae_decode_s", "write_s")
LONG_PROMPT = "a minimalist wooden desk lamp with a linen shade on an oak table, " * 17  # > 3 windows of 75 tokens
HEBREW = "אגרטל זכוכית כחול על שולחן עץ"
ARABIC = "مصباح مكتب خشبي"

# id -> (prompt, negative_prompt, seed, width, height, num_images, category, price)
AWKWARD = {
    "sku-1": ("studio photo of a red leather handbag", "blurry", None, None, None, 2, "bags", 49.5),
    "he-IL/vase": (HEBREW, None, None, None, None, None, "home", 12.0),
    "ar/lamp": (f"{ARABIC} — desk lamp", None, 5, None, None, None, "lighting", None),
    "emoji": ("🪴 potted plant in a terracotta pot 🌿", "", 7, None, None, 3, "home", 3.25),
    "long": (LONG_PROMPT, None, None, None, None, None, "lighting", 80.0),
    "wide/shoe": ("white running sneaker, side view", None, 11, 96, 64, None, "shoes", 60.0),
    "short": ("a short blue scarf", "low quality", 12, 64, 48, 2, "scarves", 9.0),
    "../x": ("an id that tries to climb out", None, 1, None, None, None, None, None),
    "a/b": ("an id with a slash", None, 2, None, None, None, None, None),
    "a_b": ("an id that slugs like a/b", None, 3, None, None, None, None, None),
    "/etc/passwd": ("an absolute-looking id", None, 4, None, None, None, None, None),
    "日本語/商品": ("a unicode id", None, None, None, None, None, None, None),
}


def awkward_catalog(path: Path) -> Path:
    ids = list(AWKWARD)
    fields = list(zip(*AWKWARD.values()))
    names = ("prompt", "negative_prompt", "seed", "width", "height", "num_images", "category", "price")
    types = (pa.string(), pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.int64(), pa.string(), pa.float64())
    columns = {"id": pa.array(ids)} | {n: pa.array(list(v), t) for n, v, t in zip(names, fields, types)}
    return write_manifest(path, columns)


def expected_images() -> list[tuple[str, int]]:
    return sorted((i, k) for i, row in AWKWARD.items() for k in range(row[5] or 1))


def png_text(path: Path) -> dict:
    with Image.open(path) as image:
        image.load()
        return {"size": image.size, "mode": image.mode, **image.info}


def files_under(folder: Path) -> set[Path]:
    return {Path(root, name) for root, _, names in os.walk(folder) for name in names}


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2, a plain one-paragraph message on stderr naming each needle, no Python traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("sdbatch: error: ")]
    assert len(message) == 1, result.stderr
    for needle in needles:
        assert needle in message[0], (needle, message[0])
    return message[0]


# ---------------------------------------------------------------- the happy path
def test_awkward_catalog_end_to_end(tmp_path):
    catalog = awkward_catalog(tmp_path / "catalog.parquet")
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "batch_size=4")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    n = len(expected_images())

    # the summary on stdout, the truncation warning on stderr
    assert f"{n} images rendered (0 failed)" in result.stdout
    assert f"{n} new, 0 changed, 0 unchanged, 0 removed" in result.stdout
    assert "images/s" in result.stdout and "stage time: text encode" in result.stdout
    assert "truncated" in result.stderr

    # one ledger row per image, every contract column filled
    rows = read_ledgers(out)
    assert [(r["id"], r["image_index"]) for r in rows] == expected_images()
    for row in rows:
        for column in CONTRACT_COLUMNS + STAGE_COLUMNS:
            assert row[column] is not None, (column, row["id"])
        assert all(row[c] >= 0 for c in STAGE_COLUMNS)
        assert row["status"] == "ok" and row["reason"] is None
        assert row["attention_backend"] == "sdpa"  # attention=auto on a CPU names what really ran
        assert (row["worker_index"], row["num_workers"], row["device"]) == (0, 1, "cpu")
        assert row["steps"] == 2 and row["guidance_scale"] == 7.5 and row["model"] == "tiny"
        prompt, negative, seed, width, height, _, category, price = AWKWARD[row["id"]]
        assert row["prompt"] == prompt  # unicode, right-to-left and emoji survive unchanged
        assert row["negative_prompt"] == (negative or "")
        assert row["seed"] == (seed if seed is not None else derive_seed(0, row["id"])) + row["image_index"]
        assert (row["width"], row["height"]) == (width or 64, height or 64)
        assert row["truncated"] == (row["id"] == "long")
        assert (row["category"], row["price"]) == (category, price)  # passthrough columns, unchanged

        # the image: under output_dir/images, decodes, right size, A1111 parameters + JSON provenance
        path = out / row["image_path"]
        assert not Path(row["image_path"]).is_absolute() and row["image_path"].startswith("images/")
        assert path.resolve().is_relative_to((out / "images").resolve())
        info = png_text(path)
        assert info["size"] == (row["width"], row["height"]) and info["mode"] == "RGB"
        negative_line = f"Negative prompt: {negative}\n" if negative else ""
        assert info["parameters"] == (
            f"{prompt}\n{negative_line}Steps: 2, Sampler: PNDM, CFG scale: 7.5, Seed: {row['seed']}, "
            f"Size: {row['width']}x{row['height']}, Model: tiny")
        provenance = json.loads(info["sdbatch"])
        assert provenance["manifest_row"]["id"] == row["id"]
        assert provenance["manifest_row"]["prompt"] == prompt
        assert provenance["manifest_row"]["category"] == category
        assert provenance["model"]["name"] == "tiny" and provenance["scheduler"]["name"] == "pndm"
        assert provenance["attention"]["backend"] == "sdpa"
        assert {"sdbatch", "torch", "diffusers", "transformers"} <= set(provenance["versions"])
        assert provenance["content_key"] == row["content_key"]

    # id -> file: collision-free, and the documented stable form <slug>-<sha256(id)[:12]>_<index>.png
    paths = [r["image_path"] for r in rows]
    assert len(set(paths)) == len(paths)
    for row in rows:
        digest = hashlib.sha256(row["id"].encode()).hexdigest()[:12]
        assert row["image_path"] == f"images/{row['shard']:05d}/" + Path(row["image_path"]).name
        assert Path(row["image_path"]).name.endswith(f"-{digest}_{row['image_index']}.png")
    by_id = {r["id"]: Path(r["image_path"]).name for r in rows if r["image_index"] == 0}
    assert by_id["../x"].startswith("x-") and by_id["/etc/passwd"].startswith("etc_passwd-")

    # nothing outside output_dir: no Hydra folders, no stray files next to the manifest
    assert files_under(tmp_path) - files_under(out) == {catalog}
    images = {p for p in files_under(out / "images")}
    assert images == {out / p for p in paths}
    assert (out / "sdbatch.json").exists()
    assert [p.name for p in (out / "ledger").iterdir()] == ["shard-00000.parquet"]


def test_bundled_example_renders(tmp_path):
    result = cli(tmp_path, f"prompts={REPO / 'examples' / 'catalog.parquet'}", "output_dir=out", "steps=2")
    assert result.returncode == 0, result.stderr
    rows = read_ledgers(tmp_path / "out")
    assert rows and all(r["status"] == "ok" for r in rows)
    assert f"{len(rows)} images rendered (0 failed)" in result.stdout
    assert all((tmp_path / "out" / r["image_path"]).exists() for r in rows)


# ---------------------------------------------------------------- bad input: exit 2, plain words, nothing written
def test_missing_manifest(tmp_path):
    result = cli(tmp_path, "prompts=nope.parquet", "output_dir=out")
    assert_user_error(result, "nope.parquet", "does not exist")
    assert not (tmp_path / "out").exists()


def test_not_parquet(tmp_path):
    (tmp_path / "catalog.csv").write_text("id,prompt\n1,a cat\n")
    result = cli(tmp_path, "prompts=catalog.csv", "output_dir=out")
    assert_user_error(result, "catalog.csv", "not a Parquet file")
    assert not (tmp_path / "out").exists()


def test_no_prompt_column(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a"], "text": ["a cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out")
    assert_user_error(result, "catalog.parquet", "no 'prompt' column", "'text'")
    assert not (tmp_path / "out").exists()


def test_bad_rows_are_all_named_in_one_paragraph(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {
        "id": ["ok", "null-prompt", "empty", "dup", "dup", "w100", "h-neg", "steps0", "steps-neg", "n0"],
        "prompt": ["fine", None, "   ", "x", "y", "z", "z", "z", "z", "z"],
        "width": pa.array([None, None, None, None, None, 100, None, None, None, None], pa.int64()),
        "height": pa.array([None, None, None, None, None, None, -8, None, None, None], pa.int64()),
        "steps": pa.array([None, None, None, None, None, None, None, 0, -1, None], pa.int64()),
        "num_images": pa.array([None, None, None, None, None, None, None, None, None, 0], pa.int64()),
    })
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out")
    message = assert_user_error(
        result, "catalog.parquet", "column 'prompt'", "null-prompt", "empty", "column 'id'", "dup",
        "column 'width'", "w100", "column 'height'", "h-neg", "column 'steps'", "steps0", "steps-neg",
        "column 'num_images'", "n0", "on_invalid=skip")
    assert "ok," not in message and "ids: ok" not in message
    assert not (tmp_path / "out").exists()


def test_non_text_prompts(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": [1, 2]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out")
    assert_user_error(result, "catalog.parquet", "column 'prompt'", "not text", "a, b")
    assert not (tmp_path / "out").exists()


BAD_ROWS = {  # name -> (columns, words the message must hold)
    "null prompt": ({"id": ["a", "b"], "prompt": ["ok", None]}, ["column 'prompt'", "ids: b"]),
    "empty prompt": ({"id": ["a", "b"], "prompt": ["", "ok"]}, ["column 'prompt'", "ids: a"]),
    "blank prompt": ({"id": ["a", "b"], "prompt": ["ok", " \t"]}, ["column 'prompt'", "ids: b"]),
    "non-text prompt": ({"id": ["a"], "prompt": [3.5]}, ["column 'prompt'", "not text", "ids: a"]),
    "duplicate ids": ({"id": [7, 8, 7], "prompt": ["x", "y", "z"]}, ["column 'id'", "duplicated ids: 7"]),
    "width not /8": ({"id": ["a", "b"], "prompt": ["x", "y"], "width": [64, 100]}, ["column 'width'", "ids: b"]),
    "height not /8": ({"id": ["a"], "prompt": ["x"], "height": [63]}, ["column 'height'", "ids: a"]),
    "steps 0": ({"id": ["a", "b"], "prompt": ["x", "y"], "steps": [0, 2]}, ["column 'steps'", "ids: a"]),
    "steps negative": ({"id": ["a"], "prompt": ["x"], "steps": [-3]}, ["column 'steps'", "ids: a"]),
    "num_images 0": ({"id": ["a"], "prompt": ["x"], "num_images": [0]}, ["column 'num_images'", "ids: a"]),
    "num_images negative": ({"id": ["a", "b"], "prompt": ["x", "y"], "num_images": [1, -2]},
                            ["column 'num_images'", "ids: b"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_each_bad_row_stops_before_writing(tmp_path, make_cfg, case):
    columns, needles = BAD_ROWS[case]
    path = write_manifest(tmp_path / "catalog.parquet", columns)
    with pytest.raises(SdbatchError) as caught:
        run(make_cfg(f"prompts={path}"))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out").exists()


def test_on_invalid_skip_renders_the_rest_and_ledgers_the_bad(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {
        "id": ["good-1", "null", "w100", "dup", "dup", "good-2"],
        "prompt": ["a red cat", None, "a dog", "x", "y", "a bird"],
        "width": pa.array([None, None, 100, None, None, None], pa.int64()),
        "category": ["a", "b", "c", "d", "e", "f"],
    })
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "on_invalid=skip")
    assert result.returncode == 0, result.stderr
    assert "2 images rendered (0 failed)" in result.stdout
    rows = read_ledgers(tmp_path / "out")
    ok = {r["id"] for r in rows if r["status"] == "ok"}
    skipped = {(r["id"], r["category"]): r["reason"] for r in rows if r["status"] == "skipped"}
    assert ok == {"good-1", "good-2"}
    assert skipped == {("null", "b"): "empty or null prompt", ("w100", "c"): "width is not a positive multiple of 8",
                       ("dup", "d"): "duplicate id", ("dup", "e"): "duplicate id"}
    assert all(r["image_path"] is None for r in rows if r["status"] == "skipped")
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 2


# ---------------------------------------------------------------- bad settings: exit 2, nothing written
def test_xformers_on_cpu_is_refused_before_rendering(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "attention=xformers", "device=cpu")
    assert_user_error(result, "xformers needs a CUDA GPU", "attention=sdpa")
    assert not (tmp_path / "out").exists()


def test_bad_run_settings(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "width=100", "batch_size=0")
    assert_user_error(result, "width=100 must be a positive multiple of 8", "batch_size=0 must be at least 1")
    assert not (tmp_path / "out").exists()


def test_missing_weights_say_what_to_pass(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=sd15", "model.path=/nonexistent")
    assert_user_error(result, "/nonexistent", "model.path=", "model=tiny")
    assert not (tmp_path / "out").exists()
