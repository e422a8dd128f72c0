"""The manifest as the worker sees it: read in chunks, normalised and checked column by column, planned, expanded."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_hive_parts
from sdbatch import SdbatchError
from sdbatch import manifest as manifest_module
from sdbatch.manifest import Defaults, Manifest, derive_seed
from sdbatch.plan import Plan, build
from sdbatch.shard import expand

DEFAULTS = Defaults(steps=20, guidance_scale=7.5, width=64, height=48, seed=7, negative_prompt="blurry")


def read_manifest(path, defaults=DEFAULTS, on_invalid="error", num_shards=1):
    """Plan the manifest into one shard and expand it, as a worker does: the images and the skipped rows."""
    manifest = Manifest(path)
    folder = Path(tempfile.mkdtemp(prefix="sdbatch-plan-"))
    plan = Plan(folder, build(manifest, num_shards, folder))
    if plan.problems.count and on_invalid == "error":
        raise SdbatchError(plan.problems.message(str(path)))
    jobs, skipped = [], []
    for shard in range(num_shards):
        rows = plan.rows(shard)
        extra = [{n: rows.column(n)[i].as_py() for n in plan.passthrough} for i in range(rows.num_rows)]
        for image in expand(rows, defaults).to_pylist():
            jobs.append(SimpleNamespace(**image, extra=extra[image["_row"]]))
        for i, row in enumerate(rows.to_pylist()):
            if row["reason"] is not None:
                skipped.append(SimpleNamespace(id=row["id"], prompt=row["prompt"], reason=row["reason"],
                                               extra=extra[i]))
    return SimpleNamespace(jobs=jobs, skipped=skipped, num_rows=manifest.num_rows, plan=plan)


def write(tmp_path, columns, name="catalog.parquet", schema=None):
    path = tmp_path / name
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(SdbatchError) as caught:
        read_manifest(path, DEFAULTS, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- files ---------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    assert str(tmp_path / "nope.parquet") in error_of(tmp_path / "nope.parquet")


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.parquet").mkdir()
    assert "dir.parquet" in error_of(tmp_path / "dir.parquet")


def test_non_parquet_file(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt\n1,a cat\n")
    message = error_of(path)
    assert f"{path} is not a Parquet file: " in message


def test_empty_manifest(tmp_path):
    path = write(tmp_path, {"prompt": pa.array([], pa.string())})
    assert "no rows" in error_of(path)


def test_missing_prompt_column_lists_columns(tmp_path):
    path = write(tmp_path, {"id": ["a"], "text": ["a cat"]})
    message = error_of(path)
    assert "'prompt'" in message and "'id'" in message and "'text'" in message


# --- valid manifests -----------------------------------------------------------------------------


def test_defaults_fill_missing_columns_and_nulls(tmp_path):
    path = write(tmp_path, {
        "prompt": ["a cat", "a dog"],
        "steps": pa.array([None, 5], pa.int64()),
        "negative_prompt": [None, "dark"],
        "guidance_scale": [None, 3.0],
    })
    first, second = read_manifest(path, DEFAULTS).jobs
    assert (first.id, first.steps, first.negative_prompt, first.guidance_scale) == ("0", 20, "blurry", 7.5)
    assert (first.width, first.height) == (64, 48)
    assert (second.id, second.steps, second.negative_prompt, second.guidance_scale) == ("1", 5, "dark", 3.0)


def test_int_and_text_ids(tmp_path):
    ints = read_manifest(write(tmp_path, {"id": [10, 2], "prompt": ["a", "b"]}, "ints.parquet"), DEFAULTS)
    texts = read_manifest(write(tmp_path, {"id": ["sku/9", "../x"], "prompt": ["a", "b"]}, "texts.parquet"), DEFAULTS)
    assert [job.id for job in ints.jobs] == ["10", "2"]
    assert [job.id for job in texts.jobs] == ["sku/9", "../x"]


def test_whole_floats_accepted_in_int_columns(tmp_path):
    # pandas stores int columns with nulls as floats
    path = write(tmp_path, {"id": [1.0, 2.0], "prompt": ["a", "b"], "width": [512.0, None], "seed": [3.0, None]})
    first, second = read_manifest(path, DEFAULTS).jobs
    assert (first.id, first.width, first.seed) == ("1", 512, 3)
    assert isinstance(first.width, int) and isinstance(first.seed, int)
    assert (second.width, second.seed) == (64, derive_seed(7, "2"))


def test_unicode_prompts_pass_through(tmp_path):
    prompts = ["ein Café über Zürich", "قطة على السطح", "שלום עולם", "🐱‍👤 ninja cat 🌸", "猫が寝ている"]
    path = write(tmp_path, {"id": ["é", "ع", "ש", "🐱", "猫"], "prompt": prompts})
    manifest = read_manifest(path, DEFAULTS)
    assert [job.prompt for job in manifest.jobs] == prompts
    assert [job.id for job in manifest.jobs] == ["é", "ع", "ש", "🐱", "猫"]


def test_num_images_expands_rows_with_consecutive_seeds(tmp_path):
    path = write(tmp_path, {"id": ["a", "b"], "prompt": ["x", "y"], "seed": [100, None], "num_images": [3, None]})
    jobs = read_manifest(path, DEFAULTS).jobs
    assert [(job.id, job.image_index, job.seed) for job in jobs] == [
        ("a", 0, 100), ("a", 1, 101), ("a", 2, 102), ("b", 0, derive_seed(7, "b")),
    ]


def test_derive_seed_is_stable_and_in_range():
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert derive_seed(0, "a") != derive_seed(1, "a")
    assert all(0 <= derive_seed(0, str(i)) < 2**32 for i in range(1000))


def test_derived_seeds_survive_rows_added_and_removed(tmp_path):
    before = read_manifest(write(tmp_path, {"id": ["a", "b", "c"], "prompt": ["x"] * 3}, "before.parquet"), DEFAULTS)
    after = read_manifest(write(tmp_path, {"id": ["new", "c", "a"], "prompt": ["x"] * 3}, "after.parquet"), DEFAULTS)
    seeds_before = {job.id: job.seed for job in before.jobs}
    seeds_after = {job.id: job.seed for job in after.jobs}
    assert seeds_before["a"] == seeds_after["a"] and seeds_before["c"] == seeds_after["c"]


def test_passthrough_columns_unchanged(tmp_path):
    path = write(tmp_path, {
        "prompt": ["a", "b"],
        "sku": ["X-1", None],
        "price": [9.5, 3.0],
        "tags": [["red", "big"], []],
        "meta": [{"k": 1}, {"k": 2}],
    })
    jobs = read_manifest(path, DEFAULTS).jobs
    assert jobs[0].extra == {"sku": "X-1", "price": 9.5, "tags": ["red", "big"], "meta": {"k": 1}}
    assert jobs[1].extra == {"sku": None, "price": 3.0, "tags": [], "meta": {"k": 2}}


def test_dictionary_encoded_prompts(tmp_path):
    prompts = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    path = write(tmp_path, {"prompt": prompts})
    assert [job.prompt for job in read_manifest(path, DEFAULTS).jobs] == ["a cat", "a dog", "a cat"]


# --- invalid rows --------------------------------------------------------------------------------


def test_bad_prompts(tmp_path):
    path = write(tmp_path, {"id": ["ok", "n", "e", "w", "sku/9"], "prompt": ["a cat", None, "", " \t\u3000", "fine"]})
    message = error_of(path)
    assert message.startswith(f"{path}: 3 rows have an empty or null prompt (column 'prompt', ids: n, e, w)")
    assert "on_invalid=skip" in message


def test_non_text_prompt_column_makes_rows_invalid(tmp_path):
    path = write(tmp_path, {"id": ["a", "b"], "prompt": [1, 2]})
    message = error_of(path)
    assert "column 'prompt'" in message and "ids: a, b" in message and "not text" in message
    skipped = read_manifest(path, DEFAULTS, on_invalid="skip").skipped
    assert [(row.id, row.prompt) for row in skipped] == [("a", None), ("b", None)]


def test_duplicate_ids_named(tmp_path):
    path = write(tmp_path, {"id": ["a", "b", "a", "c", "b", "a"], "prompt": ["x"] * 6})
    message = error_of(path)
    assert "5 rows have an id that another row also has (column 'id', duplicated ids: a, b)" in message


def test_duplicate_ids_all_skipped(tmp_path):
    path = write(tmp_path, {"id": [1, 2, 1], "prompt": ["x", "y", "z"]})
    manifest = read_manifest(path, DEFAULTS, on_invalid="skip")
    assert [job.id for job in manifest.jobs] == ["2"]
    assert [(row.id, row.prompt, row.reason) for row in manifest.skipped] == [
        ("1", "x", "duplicate id"), ("1", "z", "duplicate id"),
    ]


def test_null_ids(tmp_path):
    path = write(tmp_path, {"id": ["a", None], "prompt": ["x", "y"]})
    assert "1 row has a null id (column 'id', row numbers: 1)" in error_of(path)
    skipped = read_manifest(path, DEFAULTS, on_invalid="skip").skipped[0]
    assert skipped.id is None and skipped.reason == "null id"  # never "row 1": a real id could be that


@pytest.mark.parametrize("column", ["width", "height"])
def test_sizes_not_multiple_of_8(tmp_path, column):
    path = write(tmp_path, {"id": ["a", "b", "c", "d", "e"], "prompt": ["x"] * 5, column: [512, 500, 0, -8, 512.5]})
    message = error_of(path)
    assert f"4 rows have a {column} that is not a positive multiple of 8 (column '{column}', ids: b, c, d, e)" in message


@pytest.mark.parametrize("column", ["steps", "num_images"])
def test_counts_below_one(tmp_path, column):
    path = write(tmp_path, {"id": ["a", "b", "c", "d"], "prompt": ["x"] * 4, column: [1.0, 0, -3, 2.5]})
    message = error_of(path)
    assert f"3 rows have a {column} value that is not a whole number of at least 1 (column '{column}', ids: b, c, d)" in message


def test_bad_seeds_and_guidance(tmp_path):
    path = write(tmp_path, {
        "id": ["a", "b", "c"], "prompt": ["x"] * 3,
        "seed": [-1, 2.5, 5], "guidance_scale": [float("nan"), 1.0, float("inf")],
    })
    message = error_of(path)
    assert "2 rows have a seed" in message and "(column 'seed', ids: a, b)" in message
    assert "2 rows have a guidance_scale that is not a finite number (column 'guidance_scale', ids: a, c)" in message


def test_all_problems_in_one_message(tmp_path):
    path = write(tmp_path, {"id": ["a", "b", "c"], "prompt": ["x", "", "z"], "width": [512, 512, 100]})
    message = error_of(path)
    assert "1 row has an empty or null prompt (column 'prompt', ids: b); " in message
    assert "1 row has a width that is not a positive multiple of 8 (column 'width', ids: c)" in message


def test_listing_stops_at_ten(tmp_path):
    path = write(tmp_path, {"id": [f"r{i}" for i in range(47)], "prompt": [""] * 47})
    message = error_of(path)
    ids = ", ".join(f"r{i}" for i in range(10))
    assert f"47 rows have an empty or null prompt (column 'prompt', ids: {ids} and 37 more)" in message
    assert "r10" not in message


def test_odd_ids_are_quoted_in_messages(tmp_path):
    path = write(tmp_path, {"id": ["", "a\nb"], "prompt": ["", ""]})
    message = error_of(path)
    assert "ids: '', 'a\\nb'" in message


def test_skip_keeps_valid_rows_and_records_reasons(tmp_path):
    path = write(tmp_path, {
        "id": ["good", "bad", "worse"],
        "prompt": ["a cat", " ", "a dog"],
        "width": [512, 512, 7],
        "steps": [10, 0, 10],
        "shop": ["s1", "s2", "s3"],
    })
    manifest = read_manifest(path, DEFAULTS, on_invalid="skip")
    assert manifest.num_rows == 3
    assert [job.id for job in manifest.jobs] == ["good"]
    bad, worse = manifest.skipped
    assert (bad.id, bad.prompt, bad.extra) == ("bad", " ", {"shop": "s2"})
    assert "empty or null prompt" in bad.reason and "steps" in bad.reason
    assert (worse.id, worse.extra) == ("worse", {"shop": "s3"})
    assert "width" in worse.reason


# --- wrong column types --------------------------------------------------------------------------


@pytest.mark.parametrize("column, values", [
    ("steps", ["20"]),
    ("width", [True]),
    ("negative_prompt", [3]),
    ("guidance_scale", ["7.5"]),
    ("id", [[1]]),
])
def test_wrong_column_type(tmp_path, column, values):
    path = write(tmp_path, {"prompt": ["a cat"], column: values})
    message = error_of(path, on_invalid="skip")
    assert str(path) in message and f"column '{column}' has type" in message


def test_all_null_columns_are_fine(tmp_path):
    path = write(tmp_path, {"prompt": ["a cat"], "steps": pa.nulls(1), "negative_prompt": pa.nulls(1)})
    (job,) = read_manifest(path, DEFAULTS).jobs
    assert (job.steps, job.negative_prompt) == (20, "blurry")


# --- read in chunks, planned into shards ---------------------------------------------------------


def test_chunks_and_shards_change_nothing(tmp_path, monkeypatch):
    ids = [f"sku-{i}" for i in range(50)] + ["sku-3"]  # one duplicate, far from its twin
    path = write(tmp_path, {"id": ids, "prompt": [f"p{i}" for i in range(51)], "seed": list(range(51))})
    whole = read_manifest(path, on_invalid="skip")
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 7)
    chunked = read_manifest(path, on_invalid="skip", num_shards=5)
    key = lambda job: (job.id, job.image_index)  # noqa: E731
    assert sorted((j.id, j.seed, j.prompt) for j in whole.jobs) == sorted((j.id, j.seed, j.prompt) for j in chunked.jobs)
    assert sorted(key(j) for j in chunked.jobs) == sorted((i, 0) for i in ids if i != "sku-3")
    assert sorted((s.id, s.reason) for s in chunked.skipped) == [("sku-3", "duplicate id")] * 2
    assert "2 rows have an id that another row also has (column 'id', duplicated ids: sku-3)" in error_of(path)


def test_a_folder_of_parts_is_one_manifest_with_partition_columns(tmp_path):
    folder = write_hive_parts(tmp_path / "catalog", "category", {"bags": ["b1", "b2"], "shoes": ["s1"]})
    manifest = read_manifest(folder)
    assert sorted((j.id, j.extra["category"]) for j in manifest.jobs) == [("b1", "bags"), ("b2", "bags"),
                                                                          ("s1", "shoes")]
    assert manifest.num_rows == 3
    glob_manifest = read_manifest(str(folder / "*" / "*.parquet"))
    assert sorted(j.id for j in glob_manifest.jobs) == ["b1", "b2", "s1"]


def test_errors_in_a_part_name_the_part(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), folder / "part-0.parquet")
    (folder / "part-1.parquet").write_text("not parquet")
    assert f"{folder / 'part-1.parquet'} is not a Parquet file" in error_of(folder)


def test_invalid_utf8_is_an_invalid_row_not_a_crash(tmp_path):
    broken = pa.array([b"fine", b"bad \xff\xfe", b"ok"], pa.binary()).cast(pa.string(), safe=False)
    path = write(tmp_path, {"id": ["a", "b", "c"], "prompt": broken})
    assert "1 row has a prompt that is not valid UTF-8 (column 'prompt', ids: b)" in error_of(path)
    manifest = read_manifest(path, on_invalid="skip")
    assert [j.id for j in manifest.jobs] == ["a", "c"]
    assert [(s.id, s.reason) for s in manifest.skipped] == [("b", "prompt is not valid UTF-8")]


def test_misspelled_known_columns_are_named(tmp_path):
    path = write(tmp_path, {"prompt": ["x"], "seeds": [1], "num_image": [2], "negative": ["dark"], "price": [1.0]})
    warnings = Manifest(path).misspelled()
    assert any("'seeds'" in w and "'seed'" in w for w in warnings)
    assert any("'num_image'" in w and "'num_images'" in w for w in warnings)
    assert any("'negative'" in w and "'negative_prompt'" in w for w in warnings)
    assert not any("'price'" in w for w in warnings)


def test_passthrough_keeps_types_and_never_loses_a_column(tmp_path):
    path = write(tmp_path, {"prompt": ["x"], "status": ["live"], "manifest_status": ["old"],
                            "big": pa.array([2**64 - 1], pa.uint64())})
    manifest = read_manifest(path)
    # `status` is a ledger column: it becomes manifest_status, which the manifest has too, so one more prefix
    assert manifest.plan.passthrough == ["manifest_manifest_status", "manifest_status", "big"]
    assert manifest.jobs[0].extra == {"manifest_manifest_status": "live", "manifest_status": "old", "big": 2**64 - 1}


def test_sizes_and_steps_beyond_the_model_and_scheduler_are_named(tmp_path):
    path = write(tmp_path, {"id": ["ok", "tiny", "long"], "prompt": ["x"] * 3, "width": [64, 8, 64],
                            "steps": [20, 20, 1200]})
    with pytest.raises(SdbatchError) as caught:
        manifest = Manifest(path, max_steps=999, min_size=16)
        folder = Path(tempfile.mkdtemp(prefix="sdbatch-plan-"))
        plan = Plan(folder, build(manifest, 1, folder))
        raise SdbatchError(plan.problems.message(str(path)))
    message = str(caught.value)
    assert "1 row has a width that is below the model's minimum of 16 (column 'width', ids: tiny)" in message
    assert "1 row has a steps value that is more than the scheduler can place (at most 999) (column 'steps', ids: long)" \
        in message
