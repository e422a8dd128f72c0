"""The output folder's records: per-shard Parquet ledgers, content keys, and the run-level settings (sdbatch.json)."""

import hashlib
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch import SdbatchError
from sdbatch.writer import write_atomic

log = logging.getLogger("sdbatch")
SETTINGS_FILE = "sdbatch.json"
CORE_SCHEMA = pa.schema([
    ("id", pa.string()), ("image_index", pa.int64()), ("seed", pa.int64()),
    ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("lora", pa.string()), ("lora_scale", pa.float64()),
    ("content_key", pa.string()), ("image_path", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("truncated", pa.bool_()), ("attention_backend", pa.string()), ("attention_detail", pa.string()),
    ("model", pa.string()), ("scheduler", pa.string()),
    ("shard", pa.int64()), ("worker_index", pa.int64()), ("num_workers", pa.int64()), ("device", pa.string()),
    ("batch_size", pa.int64()), ("text_encode_s", pa.float64()), ("denoise_s", pa.float64()),
    ("vae_decode_s", pa.float64()), ("write_s", pa.float64()), ("finished_at", pa.timestamp("us", tz="UTC")),
])
CORE_COLUMNS = tuple(CORE_SCHEMA.names)
ROW_INDEX = "_row"  # in core tables: which row of the shard's plan rows (passthrough values) a ledger row takes
CORE_WITH_ROW = CORE_SCHEMA.append(pa.field(ROW_INDEX, pa.int64()))


def content_key(prompt: str, negative_prompt: str, seed: int, width: int, height: int, steps: int,
                guidance_scale: float, scheduler: str, model: str, extras: dict | None = None) -> str:
    """Hash of everything that decides an image's pixels. `extras` holds only the settings that differ from what
    the first sdbatch always used, so the keys of folders it made stay valid."""
    fields = [prompt, negative_prompt, seed, width, height, steps, float(guidance_scale), scheduler, model]
    if extras:
        fields.append(extras)
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:32]


FIRST_SCHEDULER_OPTIONS = {  # what the first sdbatch shipped for each scheduler (content keys then held none)
    "pndm": {"skip_prk_steps": True},
    "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "euler": {},
}


def key_extras(dtype: str, scheduler: str, scheduler_options: dict, image_format: dict,
               loras: list | None = None, vae_dtype: str = "auto") -> dict:
    """The pixel-deciding settings the first sdbatch's content keys left out, where they differ from its values
    (it rendered in fp16 on GPUs with the VAE's dtype chosen for it, with the scheduler options it shipped, into PNG
    files, without LoRAs). `loras`: the run-level LoRAs as [{"sha256": fingerprint, "scale": scale}]."""
    extras = {"lora": list(loras)} if loras else {}
    if image_format["name"] != "png":
        extras["image_format"] = image_format
    if dtype != "fp16":
        extras["dtype"] = dtype
    if vae_dtype != "auto":
        extras["vae_dtype"] = vae_dtype
    if scheduler_options != FIRST_SCHEDULER_OPTIONS.get(scheduler):
        extras["scheduler_options"] = scheduler_options
    return extras


# ---------------------------------------------------------------- ledgers
def ledger_path(output_dir: Path, shard: int) -> Path:
    return Path(output_dir) / "ledger" / f"shard-{shard:05d}.parquet"


def read_ledger(path: Path) -> pa.Table | None:
    """The shard's ledger, or None when it has none yet."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        return None
    except Exception as error:
        raise SdbatchError(f"The ledger {path} cannot be read ({error}). Move it aside and rerun: "
                           f"its shard's images will be re-adopted from their metadata.") from None


def core_rows(rows: list[dict]) -> pa.Table:
    """Ledger rows built by this worker (dicts with core columns and _row) as a core table."""
    return pa.Table.from_pylist([{k: r.get(k) for k in CORE_WITH_ROW.names} for r in rows], schema=CORE_WITH_ROW)


def as_core(table: pa.Table, row_index: pa.Array) -> pa.Table:
    """An existing ledger's rows as a core table (columns an older ledger lacks are null), with their _row."""
    columns = []
    for field in CORE_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns + [row_index], schema=CORE_WITH_ROW)


def ledger_table(core: pa.Table, plan_rows: pa.Table, passthrough: list[str]) -> pa.Table:
    """Core columns, then today's passthrough columns in the manifest's own Arrow types."""
    table = core.select(list(CORE_COLUMNS))
    index = core.column(ROW_INDEX)
    for name in passthrough:
        table = table.append_column(name, plan_rows.column(name).take(index))
    return table


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- run-level settings
def open_folder(output_dir: Path, settings: dict, num_shards: int, overwrite: bool, shard_size: int,
                check_only: bool = False) -> int:
    """Fix or check the folder's run-level settings; returns its shard count (fixed at the first run).

    A setting the folder has no record of (an older sdbatch did not have it) compares as what that sdbatch did:
    `extras` as {}, and anything else as accepted (and recorded from now on)."""
    path = Path(output_dir) / SETTINGS_FILE
    if not path.exists():
        if not check_only:
            _write(path, {"num_shards": num_shards, "shard_size": shard_size, "settings": settings})
        return num_shards
    saved = _read(path)
    before = {**settings, "extras": {}, **saved["settings"]}
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed and not overwrite:
        listed = "; ".join(_differences(changed))
        raise SdbatchError(
            f"{output_dir} was rendered with other run-level settings ({listed}). That change would re-render "
            f"every image that uses them. Pass overwrite=true to do that, or put the setting back "
            f"(or use a new output_dir).")
    if check_only:
        return saved["num_shards"]
    if saved.get("shard_size", shard_size) != shard_size:
        log.warning("shard_size=%d is ignored: %s keeps the %d shards fixed at its first run (shard_size=%s)",
                    shard_size, output_dir, saved["num_shards"], saved.get("shard_size", "?"))
    if settings != saved["settings"]:
        _write(path, {**saved, "settings": settings})
    return saved["num_shards"]


def _differences(changed: dict) -> list[str]:
    """'steps: 2 -> 3', with the extras (a dict of settings) listed setting by setting."""
    lines = []
    for key, (old, new) in changed.items():
        if key == "extras":
            for name in sorted(set(old or {}) | set(new or {})):
                if (old or {}).get(name) != (new or {}).get(name):
                    lines.append(f"{name}: {_show((old or {}).get(name))} -> {_show((new or {}).get(name))}")
        else:
            lines.append(f"{key}: {old!r} -> {new!r}")
    return lines


def _show(value) -> str:
    """An extras value as it reads in a message: the default of the first sdbatch when it is absent."""
    if value is None:
        return "(default)"
    if isinstance(value, list) and all(isinstance(v, dict) and "sha256" in v for v in value):  # run-level LoRAs
        return "[" + ", ".join(f"sha256:{v['sha256']} scale {v['scale']:g}" for v in value) + "]"
    if isinstance(value, dict) and "name" in value:
        return repr(value["name"]) + "".join(f", {k} {v!r}" for k, v in value.items() if k != "name")
    return repr(value)


def saved_settings(output_dir: Path) -> dict:
    """The run-level settings the folder records (empty for a new folder)."""
    path = Path(output_dir) / SETTINGS_FILE
    return _read(path)["settings"] if path.exists() else {}


def folder_shards(output_dir: Path) -> int | None:
    """The folder's shard count, if it has one already."""
    path = Path(output_dir) / SETTINGS_FILE
    return _read(path)["num_shards"] if path.exists() else None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SdbatchError(f"{path} cannot be read ({error}); it records the folder's shard count and settings. "
                           "Restore it, or render into a new output_dir.") from None


def _write(path: Path, state: dict) -> None:
    write_atomic(path, json.dumps(state, indent=1).encode())
