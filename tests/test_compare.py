"""python -m sdbatch.compare: two renders of the first manifest rows, compared image by image, through its CLI."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TEST_OVERRIDES, with_repo, write_manifest
from PIL import Image

from sdbatch.compare import psnr, ssim

pytestmark = pytest.mark.xdist_group("compare")  # the module's renders are made once, on one test worker


def compare(cwd, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": with_repo(), "SDBATCH_CACHE": str(cwd / ".cache")}
    return subprocess.run([sys.executable, "-m", "sdbatch.compare", *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Three of four rows rendered at 1 step (a) and 2 steps (b)."""
    tmp = tmp_path_factory.mktemp("compare")
    manifest = write_manifest(tmp / "catalog.parquet", {"id": ["p", "q", "r", "s"], "prompt": ["a red cat"] * 4})
    done = compare(tmp, f"prompts={manifest}", "rows=3", f"output_dir={tmp / 'cmp'}", *TEST_OVERRIDES,
                   "a.steps=1", "b.steps=2")
    return tmp, done


def test_renders_the_first_rows_both_ways_and_writes_every_image(compared):
    tmp, done = compared
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp / "cmp" / "compare.parquet").to_pylist()
    assert [(r["id"], r["image_index"]) for r in table] == [("p", 0), ("q", 0), ("r", 0)]
    for r in table:  # one step against two: the images differ, and the recorded figures are the files' own
        a, b = (np.asarray(Image.open(r[side]).convert("RGB"), dtype=float) for side in ("image_a", "image_b"))
        assert r["max_abs"] == np.abs(a - b).max() > 0
        assert r["psnr_db"] == pytest.approx(psnr(a, b)) and r["ssim"] == pytest.approx(ssim(a, b))
    assert "3 image(s) compared" in done.stdout and "identical: 0" in done.stdout
    assert "furthest apart: " in done.stdout and "PSNR of the others: min" in done.stdout
    assert "rendering b: " in done.stdout and "steps=2" in done.stdout


def test_two_folders_rendered_alike_are_identical(compared):
    tmp, _ = compared
    done = compare(tmp, f"a={tmp / 'cmp' / 'a'}", f"b={tmp / 'cmp' / 'a'}", f"output_dir={tmp / 'same'}")
    assert done.returncode == 0, done.stderr
    assert "identical: 3" in done.stdout and "largest pixel difference: 0 of 255" in done.stdout
    assert all(r["max_abs"] == 0 and r["ssim"] == 1 for r in pq.read_table(tmp / "same" / "compare.parquet").to_pylist())


def test_a_render_that_fails_passes_on_its_message_and_exit_code(compared):
    tmp, _ = compared
    manifest = tmp / "catalog.parquet"
    done = compare(tmp, f"prompts={manifest}", f"output_dir={tmp / 'bad'}", *TEST_OVERRIDES, "a.guidance_scale=nan")
    assert done.returncode == 2
    assert "guidance_scale" in done.stderr and "the a render exited 2; nothing was compared" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp / "bad" / "compare.parquet").exists()


@pytest.mark.parametrize("args, message", [
    (["rows=3"], "Say which manifest to sample"),
    (["prompts=missing.parquet"], "missing.parquet does not exist"),
    (["prompts=catalog.parquet", "rows=0"], "rows=0 is not a positive whole number"),
    (["dtype"], "takes KEY=VALUE arguments, not 'dtype'"),
    (["a=x"], "give only a=DIR and b=DIR"),
    (["a=x", "b=y", "a.steps=3"], "give only a=DIR and b=DIR"),
    (["a=nowhere", "b=nowhere"], "There is no ledger folder at nowhere/ledger"),
    (["prompts=catalog.parquet", "output_dir=catalog.parquet/x"], "catalog.parquet/x: Not a directory"),
])
def test_mistakes_get_one_paragraph_and_exit_2(compared, args, message):
    tmp, _ = compared
    done = compare(tmp, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_folders_of_different_rows_or_sizes_are_refused(compared, tmp_path):
    tmp, _ = compared
    other = tmp_path / "other"
    shutil.copytree(tmp / "cmp" / "a", other)
    for ledger in (other / "ledger").glob("*.parquet"):  # the same images, recorded under other ids
        table = pq.read_table(ledger)
        renamed = pc.binary_join_element_wise("other-", table["id"], "")
        pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", renamed), ledger)
    done = compare(tmp_path, f"a={tmp / 'cmp' / 'a'}", f"b={other}")
    assert done.returncode == 2 and "hold no image of the same row" in done.stderr
    done = compare(tmp_path, f"prompts={tmp / 'catalog.parquet'}", "rows=1", f"output_dir={tmp_path / 'sized'}",
                   *TEST_OVERRIDES, "b.width=32")
    assert done.returncode == 2 and "is 64x64 in" in done.stderr and "but 32x64 in" in done.stderr


def test_help_describes_the_tool(tmp_path):
    done = compare(tmp_path, "--help")
    assert done.returncode == 0 and "a.KEY=VALUE" in done.stdout and "PSNR" in done.stdout
