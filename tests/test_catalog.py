"""Catalog features through the real command line: WebP/JPEG output (metadata, re-adoption, a format change is a
run-level change) and manifests written as a folder of Spark/Hive part files."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import cli, read_ledgers, write_hive_parts, write_manifest
from sdbatch.writer import read_parameters, read_provenance

FAST = ["model=tiny", "steps=2", "progress=false"]


@pytest.mark.parametrize("image_format, suffix", [("webp", ".webp")])  # JPEG's metadata: tests/test_writer.py
def test_lossy_formats_carry_the_a1111_text_and_are_readopted_after_a_lost_ledger(tmp_path, image_format, suffix):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": ["a red cat", "a blue dog"],
                                                  "negative_prompt": ["blurry", None]})
    args = ["prompts=catalog.parquet", "output_dir=out", *FAST, f"image_format={image_format}"]
    first = cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    rows = {r["id"]: r for r in read_ledgers(out)}
    assert all(r["image_path"].endswith(suffix) for r in rows.values())
    text = read_parameters(out / rows["a"]["image_path"])
    assert text.startswith("a red cat\nNegative prompt: blurry\nSteps: 2, Sampler: PNDM") and "Seed: " in text
    assert read_provenance(out / rows["a"]["image_path"])["ledger"]["content_key"] == rows["a"]["content_key"]
    for ledger in (out / "ledger").glob("*.parquet"):
        ledger.unlink()  # what a kill -9 before the ledger write leaves
    shutil.rmtree(out / "plans")
    again = cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "0 images rendered" in again.stdout and "2 recovered from an earlier run" in again.stdout
    assert {r["id"]: r["content_key"] for r in read_ledgers(out)} == {k: r["content_key"] for k, r in rows.items()}


def test_changing_the_format_is_refused_unless_overwrite(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a"], "prompt": ["a red cat"]})
    assert cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST).returncode == 0
    refused = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST, "image_format=webp")
    assert refused.returncode == 2 and "image_format: (default) -> 'webp'" in refused.stderr
    assert "overwrite=true" in refused.stderr and "Traceback" not in refused.stderr
    done = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST, "image_format=webp", "overwrite=true")
    assert done.returncode == 0, done.stderr
    assert "1 changed" in done.stdout
    (row,) = read_ledgers(tmp_path / "out")
    assert row["image_path"].endswith(".webp") and (tmp_path / "out" / row["image_path"]).exists()


def test_a_folder_of_hive_part_files_is_one_manifest(tmp_path):
    catalog = write_hive_parts(tmp_path / "catalog", "day", {"2026-11-25": ["a", "b"], "2026-11-26": ["c"]})
    result = cli(tmp_path, "prompts=catalog", "output_dir=out", *FAST)
    assert result.returncode == 0, result.stderr
    rows = read_ledgers(tmp_path / "out")
    assert [(r["id"], r["day"]) for r in rows] == [("a", "2026-11-25"), ("b", "2026-11-25"), ("c", "2026-11-26")]

    (catalog / "day=2026-11-26" / "part-00001.parquet").write_bytes(b"not parquet")
    broken = cli(tmp_path, "prompts=catalog", "output_dir=out", *FAST)
    assert broken.returncode == 2 and "part-00001.parquet is not a Parquet file" in broken.stderr
