"""Rerunning into the same output_dir: resume, nightly regeneration, run-level changes, id-to-path safety."""

import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import cli, read_ledgers, write_manifest
from sdbatch import SdbatchError
from sdbatch.render import Renderer
from sdbatch import EXIT_INTERRUPTED
from sdbatch.job import Job
from sdbatch.run import run


def summary(text: str) -> dict:
    """The counts of the last summary printed: rendered, new, changed, unchanged, removed, recovered."""
    rendered = re.findall(r"(\d+) images rendered", text)
    counts = re.findall(r"(\d+) new, (\d+) changed, (\d+) unchanged, (\d+) removed.*?, (\d+) recovered", text)
    assert rendered and counts, text
    return dict(zip(("rendered", "new", "changed", "unchanged", "removed", "recovered"),
                    map(int, [rendered[-1], *counts[-1]])))


def mtimes(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def images(out: Path) -> dict:
    return mtimes(out / "images")


def by_key(rows) -> dict:
    return {(r["id"], r["image_index"]): r for r in rows}


@pytest.fixture
def rendered_jobs(monkeypatch):
    """Every (id, image_index) the renderer is asked to render, across runs in this test."""
    seen = []
    original = Renderer.render

    def render(self, jobs):
        seen.extend((j.id, j.image_index) for j in jobs)
        return original(self, jobs)

    monkeypatch.setattr(Renderer, "render", render)
    return seen


CATALOG = {"id": ["a", "b", "c", "d", "e"], "prompt": ["a red cat", "a blue dog", "a green bird", "a lamp", "a vase"],
           "num_images": pa.array([None, None, None, None, 2], pa.int64())}


# ---------------------------------------------------------------- resume
def test_rerun_after_a_completed_run_renders_nothing_and_touches_nothing(tmp_path, make_cfg, capsys, rendered_jobs):
    cfg = make_cfg(f"prompts={write_manifest(tmp_path / 'catalog.parquet', CATALOG)}", "shard_size=2")
    out = Path(cfg.output_dir)
    assert run(cfg) == 0
    assert summary(capsys.readouterr().out) == dict(rendered=6, new=6, changed=0, unchanged=0, removed=0, recovered=0)
    before, ledger = mtimes(out), read_ledgers(out)
    assert len(list((out / "ledger").iterdir())) == 3 and len(ledger) == 6

    assert run(cfg) == 0
    assert summary(capsys.readouterr().out) == dict(rendered=0, new=0, changed=0, unchanged=6, removed=0, recovered=0)
    assert mtimes(out) == before  # images and ledgers untouched: complete shards are skipped at once
    assert read_ledgers(out) == ledger
    assert len(rendered_jobs) == 6


def test_half_done_run_continues_without_rendering_twice(tmp_path, make_cfg, capsys, rendered_jobs):
    ids = [f"r{i}" for i in range(8)]
    path = write_manifest(tmp_path / "catalog.parquet", {"id": ids, "prompt": [f"product {i}" for i in ids]})
    cfg = make_cfg(f"prompts={path}", "shard_size=4", "batch_size=2")
    out = Path(cfg.output_dir)
    assert run(cfg) == 0
    complete = read_ledgers(out)
    shards = {r["shard"] for r in complete}
    assert shards == {0, 1}
    capsys.readouterr()

    # a crash lost shard 0's ledger (its images are on disk) and two of shard 1's images
    (out / "ledger" / "shard-00000.parquet").unlink()
    shard1 = [r for r in complete if r["shard"] == 1]
    lost = sorted((r["id"], r["image_index"]) for r in shard1[:2])
    for row in shard1[:2]:
        (out / row["image_path"]).unlink()
    before = images(out)
    rendered_jobs.clear()

    assert run(cfg) == 0
    counts = summary(capsys.readouterr().out)
    shard0 = sum(r["shard"] == 0 for r in complete)
    assert counts["rendered"] == 2 and counts["recovered"] == shard0
    assert sorted(rendered_jobs) == lost  # only the lost images, each once
    after = images(out)
    assert {k: after[k] for k in before} == before  # every surviving image untouched
    assert len(after) == 8
    ledger = read_ledgers(out)
    assert [(r["id"], r["image_index"]) for r in ledger] == [(i, 0) for i in ids]
    assert by_key(ledger)[lost[0]]["content_key"] == by_key(complete)[lost[0]]["content_key"]


def test_stopped_run_continues_where_it_stopped(tmp_path, make_cfg, capsys, monkeypatch, rendered_jobs):
    ids = [f"r{i}" for i in range(6)]
    path = write_manifest(tmp_path / "catalog.parquet", {"id": ids, "prompt": [f"product {i}" for i in ids]})
    cfg = make_cfg(f"prompts={path}", "batch_size=2")
    out = Path(cfg.output_dir)
    original = Job.render

    def stop_after_first_batch(self, jobs):  # as SIGTERM does: the batch in flight finishes, then the run stops
        original(self, jobs)
        self.stop.set()

    monkeypatch.setattr(Job, "render", stop_after_first_batch)
    assert run(cfg) == EXIT_INTERRUPTED
    stopped = capsys.readouterr().out
    assert "interrupted: rerun the same command" in stopped
    assert summary(stopped)["rendered"] == summary(stopped)["new"] == 2  # counts of what was rendered, not planned
    first = read_ledgers(out)
    assert len(first) == 2 and len(images(out)) == 2
    before = images(out)

    monkeypatch.setattr(Job, "render", original)
    assert run(cfg) == 0
    assert summary(capsys.readouterr().out)["rendered"] == 4
    assert sorted(rendered_jobs) == [(i, 0) for i in ids]  # every image rendered exactly once over both runs
    after = images(out)
    assert {k: after[k] for k in before} == before and len(after) == 6
    assert len(read_ledgers(out)) == 6


# ---------------------------------------------------------------- nightly regeneration
DAY1 = {"id": ["a", "b", "c", "d", "e", "g"],
        "prompt": ["a red cat", "a blue dog", "a green bird", "a lamp", "a vase", "a mug"],
        "seed": pa.array([None, None, None, None, None, 5], pa.int64()),
        "num_images": pa.array([None, None, None, None, 2, None], pa.int64()),
        "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
DAY2 = {"id": ["f", "a", "b", "d", "e", "g"],  # f added, c removed, b's prompt and g's seed edited, e one image less
        "prompt": ["a new hat", "a red cat", "a blue dog, studio light", "a lamp", "a vase", "a mug"],
        "seed": pa.array([None, None, None, None, None, 6], pa.int64()),
        "num_images": pa.array([None, None, None, None, 1, None], pa.int64()),
        "price": [7.0, 1.0, 2.0, 4.5, 5.0, 6.0]}  # a passthrough edit (d) changes no pixels


def nightly(tmp_path, make_cfg, *overrides):
    day1 = make_cfg(f"prompts={write_manifest(tmp_path / 'day1.parquet', DAY1)}", "shard_size=2", *overrides)
    day2 = make_cfg(f"prompts={write_manifest(tmp_path / 'day2.parquet', DAY2)}", "shard_size=2", *overrides)
    return day1, day2


def test_nightly_rerun_renders_only_new_and_changed_rows(tmp_path, make_cfg, capsys, rendered_jobs):
    day1, day2 = nightly(tmp_path, make_cfg)
    out = Path(day1.output_dir)
    assert run(day1) == 0
    capsys.readouterr()
    old = by_key(read_ledgers(out))
    before = images(out)
    rendered_jobs.clear()

    assert run(day2) == 0
    assert summary(capsys.readouterr().out) == dict(rendered=3, new=1, changed=2, unchanged=3, removed=2, recovered=0)
    assert sorted(rendered_jobs) == [("b", 0), ("f", 0), ("g", 0)]
    after = images(out)
    for key in [("a", 0), ("d", 0), ("e", 0)]:  # unchanged images untouched
        path = Path(old[key]["image_path"]).relative_to("images")
        assert after[path] == before[path]
    for key in [("c", 0), ("e", 1)]:  # removed rows' images are kept without prune=true
        assert (out / old[key]["image_path"]).exists()

    # the ledger describes the folder as it stands: one row per current image
    ledger = by_key(read_ledgers(out))
    assert sorted(ledger) == [("a", 0), ("b", 0), ("d", 0), ("e", 0), ("f", 0), ("g", 0)]
    assert ledger[("b", 0)]["prompt"] == "a blue dog, studio light" and ledger[("g", 0)]["seed"] == 6
    assert ledger[("b", 0)]["content_key"] != old[("b", 0)]["content_key"]
    assert ledger[("a", 0)] == old[("a", 0)]
    assert all((out / r["image_path"]).exists() for r in ledger.values())

    # tomorrow, the same manifest again: nothing to do
    rendered_jobs.clear()
    assert run(day2) == 0
    assert summary(capsys.readouterr().out)["rendered"] == 0 and not rendered_jobs


def test_edited_passthrough_column_updates_the_ledger_without_rendering(tmp_path, make_cfg, rendered_jobs):
    catalog = {**CATALOG, "price": [1.0, 2.0, 3.0, 4.0, float("nan")]}
    cfg = make_cfg(f"prompts={write_manifest(tmp_path / 'catalog.parquet', catalog)}", "shard_size=2")
    out = Path(cfg.output_dir)
    assert run(cfg) == 0
    before, rendered = images(out), len(rendered_jobs)
    assert run(cfg) == 0 and len(rendered_jobs) == rendered  # NaN == NaN: nothing to restate
    write_manifest(tmp_path / "catalog.parquet", {**catalog, "price": [1.0, 2.5, 3.0, 4.0, float("nan")]})
    assert run(cfg) == 0
    assert len(rendered_jobs) == rendered and images(out) == before
    assert {r["id"]: r["price"] for r in read_ledgers(out)}["b"] == 2.5


def test_prune_deletes_the_images_of_removed_rows(tmp_path, make_cfg, capsys):
    day1, day2 = nightly(tmp_path, make_cfg)
    out = Path(day1.output_dir)
    assert run(day1) == 0
    old = by_key(read_ledgers(out))
    removed = [out / old[key]["image_path"] for key in [("c", 0), ("e", 1)]]
    capsys.readouterr()
    assert run(make_cfg(f"prompts={tmp_path / 'day2.parquet'}", "shard_size=2", "prune=true")) == 0
    assert summary(capsys.readouterr().out)["removed"] == 2
    assert not any(p.exists() for p in removed)
    current = read_ledgers(out)
    assert {out / r["image_path"] for r in current} == set((out / "images").rglob("*.png"))


def test_prune_later_deletes_images_kept_by_an_earlier_rerun(tmp_path, make_cfg, capsys):
    day1, day2 = nightly(tmp_path, make_cfg)
    out = Path(day1.output_dir)
    assert run(day1) == 0
    old = by_key(read_ledgers(out))
    assert run(day2) == 0  # without prune: c and e#1 are kept
    removed = [out / old[key]["image_path"] for key in [("c", 0), ("e", 1)]]
    assert all(p.exists() for p in removed)
    capsys.readouterr()
    assert run(make_cfg(f"prompts={tmp_path / 'day2.parquet'}", "shard_size=2", "prune=true")) == 0
    assert "(2 images pruned)" in capsys.readouterr().out
    assert not any(p.exists() for p in removed)
    assert {out / r["image_path"] for r in read_ledgers(out)} == set((out / "images").rglob("*.png"))


# ---------------------------------------------------------------- run-level changes
@pytest.mark.parametrize("change, words", [("steps=3", "steps: 2 -> 3"), ("scheduler=euler", "'pndm' -> 'euler'"),
                                           ("model.family=sdxl", "model: 'random:tiny-sd-v2' -> 'random:tiny-sdxl-v2'"),
                                           ("dtype=bf16", "dtype: 'fp32' -> 'bf16'"),
                                           ("vae_dtype=bf16", "vae_dtype: (default) -> 'bf16'"),
                                           ("+scheduler.options.timestep_spacing=trailing", "scheduler_options: (default) ->")])
def test_run_level_change_refuses_unless_overwrite(tmp_path, make_cfg, capsys, change, words):
    path = write_manifest(tmp_path / "catalog.parquet", CATALOG)
    cfg = make_cfg(f"prompts={path}")
    out = Path(cfg.output_dir)
    assert run(cfg) == 0
    before, settings = mtimes(out), (out / "sdbatch.json").read_text()

    with pytest.raises(SdbatchError) as caught:
        run(make_cfg(f"prompts={path}", change))
    message = str(caught.value)
    assert words in message and "overwrite=true" in message and "\n" not in message
    assert mtimes(out) == before and (out / "sdbatch.json").read_text() == settings
    capsys.readouterr()

    assert run(make_cfg(f"prompts={path}", change, "overwrite=true")) == 0
    assert summary(capsys.readouterr().out) == dict(rendered=6, new=0, changed=6, unchanged=0, removed=0, recovered=0)
    assert (out / "sdbatch.json").read_text() != settings
    assert run(make_cfg(f"prompts={path}", change)) == 0  # the new settings are now the folder's
    assert summary(capsys.readouterr().out)["unchanged"] == 6


def test_run_level_change_on_the_command_line_exits_2(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat"]})
    assert cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "steps=2").returncode == 0
    before = mtimes(tmp_path / "out")
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "steps=3", "scheduler=euler")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "steps: 2 -> 3" in result.stderr and "scheduler: 'pndm' -> 'euler'" in result.stderr
    assert "overwrite=true" in result.stderr
    assert mtimes(tmp_path / "out") == before


# ---------------------------------------------------------------- ids become safe, stable, distinct file names
HOSTILE_IDS = ["../x", "../../etc/passwd", "a/b", "a_b", "a b", "a\\b", "/abs/path", "C:\\Windows\\x", "~/x", ".",
               "..", "...", ".hidden", "-rf", "x" * 300, "a/b/../../../c", "日本語/商品", "null\x00byte", "tab\tid"]


def test_hostile_ids_never_write_outside_output_dir(tmp_path, make_cfg):
    path = write_manifest(tmp_path / "catalog.parquet", {"id": HOSTILE_IDS, "prompt": ["p"] * len(HOSTILE_IDS)})
    cfg = make_cfg(f"prompts={path}", "steps=1", "shard_size=5")
    out = Path(cfg.output_dir)
    assert run(cfg) == 0
    everything = {Path(root, name) for root, _, names in os.walk(tmp_path) for name in names}
    assert {p for p in everything if not p.is_relative_to(out)} == {path}
    rows = read_ledgers(out)
    assert sorted(r["id"] for r in rows) == sorted(HOSTILE_IDS)
    paths = [r["image_path"] for r in rows]
    assert len(set(paths)) == len(paths)  # collision-free
    for p in paths:
        parts = Path(p).parts
        assert parts[0] == "images" and len(parts) == 3 and ".." not in parts
        assert (out / p).resolve().parent == (out / parts[0] / parts[1]).resolve()
        assert len(parts[2].encode()) < 255
    assert set((out / "images").rglob("*.png")) == {out / p for p in paths}

    # stable: the same ids map to the same files in another folder, worker and run
    again = make_cfg(f"prompts={path}", "steps=1", "shard_size=5", f"output_dir={tmp_path / 'out2'}")
    assert run(again) == 0
    assert sorted(paths) == sorted(r["image_path"] for r in read_ledgers(tmp_path / "out2"))
