"""LoRA adapters: run-level ones fused, per-row ones switched per batch; their files in content keys; their errors."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import cli, read_ledgers, write_manifest
from sdbatch.ledger import content_key
from sdbatch.models import TINY_REVISION, fuse_projections, random_unet_inputs, tiny_model

PROMPT, SEED = "a red cat on a mat", 7


# ---------------------------------------------------------------- LoRAs for the tiny model, built with peft
def peft_lora(targets, rank, alpha, seed, text_targets=(), **unet_config):
    """(UNet LoRA layers, text-encoder LoRA layers or None) with random (non-zero) weights, as peft saves them;
    unet_config changes the tiny UNet's (a LoRA for another architecture)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    model = tiny_model()
    if unet_config:
        model.unet = UNet2DConditionModel.from_config({**model.unet.config, **unet_config})
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights=False), model.unet)
    unet = {k: v * 0.5 for k, v in get_peft_model_state_dict(model.unet).items()}
    text = None
    if text_targets:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(text_targets),
                                           init_lora_weights=False), model.text_encoders[0])
        text = get_peft_model_state_dict(model.text_encoders[0])
    return unet, text


def save_diffusers(path, unet, text=None):
    """The diffusers/PEFT layout: save_lora_weights' unet./text_encoder. keys."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(path.parent), unet_lora_layers=unet,
                                                     text_encoder_lora_layers=text, weight_name=path.name)
    return path


def save_kohya(path, unet, alpha):
    """The kohya (A1111) layout: lora_unet_<module with underscores>.lora_down/.lora_up/.alpha."""
    from safetensors.torch import save_file
    tensors = {}
    for key, value in unet.items():
        module, which = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A: diffusers layout, UNet + text encoder; B: kohya layout, other layers and rank; A2: A retrained; bad files."""
    folder = tmp_path_factory.mktemp("loras")
    files = {
        "A": save_diffusers(folder / "a.safetensors", *peft_lora(ATTENTION, 4, 4, 1, text_targets=("q_proj", "v_proj"))),
        "B": save_kohya(folder / "b.safetensors", peft_lora(("to_q", "to_v", "proj_in", "ff.net.2"), 2, 8, 2)[0], 8),
        "A2": save_diffusers(folder / "a2.safetensors", *peft_lora(ATTENTION, 4, 4, 3, text_targets=("q_proj", "v_proj"))),
    }
    wide = peft_lora(ATTENTION, 4, 4, 4, cross_attention_dim=48)[0]  # another architecture's cross-attention width
    files["misfit"] = save_diffusers(folder / "misfit.safetensors", wide)
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    files["not_lora"] = folder / "model.safetensors"
    (folder / "style.pt").write_bytes(b"\x80\x02pickle")
    files["pickle"] = folder / "style.pt"
    (folder / "style.txt").write_text("not weights")
    files["text"] = folder / "style.txt"
    files["missing"] = folder / "gone.safetensors"
    return files


def mixed_manifest(path, loras):
    """The same prompt and seed with LoRA A, B (at two scales) and none."""
    return write_manifest(path, {
        "id": ["a", "b", "none", "a07", "b05", "none2"],
        "prompt": [PROMPT] * 6,
        "seed": [SEED] * 6,
        "lora": [str(loras["A"]), str(loras["B"]), None, str(loras["A"]), str(loras["B"]), None],
        "lora_scale": pa.array([None, 1.0, None, 0.7, 0.5, None], pa.float64()),
    })


def images(output_dir) -> dict:
    """id -> (ledger row, pixels)."""
    result = {}
    for row in read_ledgers(output_dir):
        assert row["status"] == "ok", row
        with Image.open(output_dir / row["image_path"]) as image:
            result[row["id"]] = (row, np.asarray(image, np.int16))
    return result


def differs(a, b) -> bool:
    return np.abs(a - b).max() > 8


# ---------------------------------------------------------------- through the command line
def test_per_row_loras_still_apply_with_fp8_matmuls(tmp_path, loras):
    """dtype=fp8 leaves a projection that carries a LoRA in fp16: the adapter still changes its rows."""
    mixed_manifest(tmp_path / "catalog.parquet", loras)
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "progress=false",
                 "dtype=fp8")
    assert result.returncode == 0, result.stderr
    rendered = images(tmp_path / "out")
    for name in ("a", "b", "a07", "b05"):
        assert differs(rendered[name][1], rendered["none"][1]), name
    assert differs(rendered["a"][1], rendered["a07"][1])


def test_per_row_loras_change_pixels_and_batches_do_not(tmp_path, loras):
    mixed_manifest(tmp_path / "catalog.parquet", loras)
    first = cli(tmp_path, "prompts=catalog.parquet", "output_dir=one", "model=tiny", "steps=2", "progress=false",
                "batch_size=4")
    assert first.returncode == 0, first.stderr
    second = cli(tmp_path, "prompts=catalog.parquet", "output_dir=two", "model=tiny", "steps=2", "progress=false",
                 "batch_size=1", "shard_size=2")
    assert second.returncode == 0, second.stderr
    one, two = images(tmp_path / "one"), images(tmp_path / "two")

    # a row with a LoRA differs from the same row without it, and from another LoRA or scale
    none = one["none"][1]
    for name in ("a", "b", "a07", "b05"):
        assert differs(one[name][1], none), name
    assert differs(one["a"][1], one["b"][1]) and differs(one["a"][1], one["a07"][1])
    assert np.array_equal(one["none"][1], one["none2"][1])
    # batch size and shard count change nothing but float rounding; keys are identical
    assert one.keys() == two.keys()
    for name in one:
        assert one[name][0]["content_key"] == two[name][0]["content_key"], name
        assert np.abs(one[name][1] - two[name][1]).max() <= 2, name
    # a batch never mixes LoRAs: the 2 rows without one shared a batch, every LoRA row ran apart
    assert one["none"][0]["batch_size"] == 2 and one["a"][0]["batch_size"] == 1

    # the ledger says what was used; a row without a LoRA keeps the content key it had before LoRAs existed
    row = one["a07"][0]
    assert (row["lora"], row["lora_scale"]) == (str(loras["A"]), 0.7)
    assert (one["a"][0]["lora_scale"], one["none"][0]["lora"], one["none"][0]["lora_scale"]) == (1.0, None, None)
    before = content_key(PROMPT, "", SEED, 64, 64, 2, 7.5, "pndm", TINY_REVISION["sd"], {"dtype": "fp32"})
    assert one["none"][0]["content_key"] == before
    with Image.open(tmp_path / "one" / row["image_path"]) as image:
        provenance = json.loads(image.info["sdbatch"])
    assert provenance["lora"]["row"]["path"] == str(loras["A"]) and provenance["lora"]["row"]["scale"] == 0.7
    assert provenance["manifest_row"]["lora"] == str(loras["A"])


def test_retrained_lora_rerenders_only_its_rows(tmp_path, loras):
    lora_a = tmp_path / "style.safetensors"
    lora_a.write_bytes(loras["A"].read_bytes())
    write_manifest(tmp_path / "catalog.parquet", {
        "id": ["a", "b", "none"], "prompt": [PROMPT] * 3, "seed": [SEED] * 3,
        "lora": [str(lora_a), str(loras["B"]), None]})
    args = ("prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "progress=false")
    assert cli(tmp_path, *args).returncode == 0
    before = images(tmp_path / "out")

    lora_a.write_bytes(loras["A2"].read_bytes())  # retrained: same path, same shapes, new weights
    rerun = cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 images rendered" in rerun.stdout and "0 new, 1 changed, 2 unchanged" in rerun.stdout, rerun.stdout
    after = images(tmp_path / "out")
    assert after["a"][0]["content_key"] != before["a"][0]["content_key"] and differs(after["a"][1], before["a"][1])
    for name in ("b", "none"):
        assert after[name][0]["content_key"] == before[name][0]["content_key"]


def test_run_level_lora_is_a_run_level_setting(tmp_path, loras):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["x"], "prompt": [PROMPT], "seed": [SEED]})
    args = ("prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "progress=false")
    first = cli(tmp_path, *args, f"lora=[{{path: {loras['A']}, scale: 0.8}}]")
    assert first.returncode == 0, first.stderr
    row = read_ledgers(tmp_path / "out")[0]
    assert row["lora"] is None  # the ledger's lora is the row's; the run's is in the provenance and sdbatch.json
    with Image.open(tmp_path / "out" / row["image_path"]) as image:
        run_loras = json.loads(image.info["sdbatch"])["lora"]["run"]
    assert [(lora["path"], lora["scale"]) for lora in run_loras] == [(str(loras["A"]), 0.8)]

    changed = cli(tmp_path, *args, f"lora=[{{path: {loras['A']}, scale: 0.5}}]")
    assert changed.returncode == 2
    assert "other run-level settings (lora:" in changed.stderr and "overwrite=true" in changed.stderr
    assert "Traceback" not in changed.stderr
    dropped = cli(tmp_path, *args)
    assert dropped.returncode == 2 and "lora: [sha256:" in dropped.stderr and "-> (default)" in dropped.stderr


def test_bad_lora_rows_exit_2_naming_them(tmp_path, loras):
    write_manifest(tmp_path / "catalog.parquet", {
        "id": ["ok", "gone", "pickled", "text", "model", "orphan_scale", "nan_scale", "empty"],
        "prompt": [PROMPT] * 8,
        "lora": [str(loras["A"]), str(loras["missing"]), str(loras["pickle"]), str(loras["text"]),
                 str(loras["not_lora"]), None, str(loras["A"]), ""],
        "lora_scale": pa.array([None, None, None, None, None, 0.5, float("nan"), None], pa.float64()),
    })
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "progress=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.split("sdbatch: error: ", 1)[1]
    assert len(message.strip().splitlines()) == 1  # one paragraph
    for words in (f"a lora file that does not exist ({loras['missing']}) (column 'lora', ids: gone)",
                  "a lora file that is a pickle file (.pt)", "(column 'lora', ids: pickled)",
                  "a lora file that is a .txt file, not .safetensors", "(column 'lora', ids: text)",
                  "a lora file that is not a LoRA", "(column 'lora', ids: model)",
                  "a lora_scale but no lora (the scale needs a LoRA file) (column 'lora_scale', ids: orphan_scale)",
                  "a lora_scale that is not a finite number (column 'lora_scale', ids: nan_scale)",
                  "an empty lora (write null for none) (column 'lora', ids: empty)", "on_invalid=skip"):
        assert words in message, (words, message)
    assert not (tmp_path / "out").exists()  # refused before anything was written

    run_level = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2",
                    f"lora=[{{path: {loras['pickle']}}}]")
    assert run_level.returncode == 2 and f"lora[0].path={loras['pickle']}: the file is a pickle" in run_level.stderr
    shape = cli(tmp_path, "prompts=catalog.parquet", "lora=[{scale: 2}]")
    assert shape.returncode == 2 and "lora=[{'scale': 2}] must be a list of {path:" in shape.stderr


def test_wrongly_typed_lora_columns_make_their_rows_invalid(tmp_path):
    from sdbatch.manifest import Manifest, Problems, record_problems
    path = write_manifest(tmp_path / "catalog.parquet", {
        "id": ["n", "t", "plain"], "prompt": [PROMPT] * 3, "lora": pa.array([3, None, None], pa.int64()),
        "lora_scale": pa.array(["0.5", "high", None], pa.string())})
    problems = Problems()
    for _, rows in Manifest(path).chunks():
        record_problems(rows, problems)
        assert rows.column("reason").to_pylist()[2] is None
    message = problems.message(str(path))
    assert "1 row has a lora that is not text (the column holds int64) (column 'lora', ids: n)" in message
    assert "2 rows have a lora_scale that is not a number (the column holds string) (column 'lora_scale', ids: n, t)" \
        in message


def test_skipped_and_misfit_lora_rows_let_the_run_go_on(tmp_path, loras):
    write_manifest(tmp_path / "catalog.parquet", {
        "id": ["plain", "gone", "misfit", "a"], "prompt": [PROMPT] * 4,
        "lora": [None, str(loras["missing"]), str(loras["misfit"]), str(loras["A"])]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=2", "progress=false",
                 "on_invalid=skip")
    assert result.returncode == 0, result.stderr
    assert "3 images rendered (1 failed)" in result.stdout
    rows = {row["id"]: row for row in read_ledgers(tmp_path / "out")}
    assert rows["plain"]["status"] == rows["a"]["status"] == "ok"
    assert rows["gone"]["status"] == "skipped" and "lora file does not exist" in rows["gone"]["reason"]
    misfit = rows["misfit"]
    assert misfit["status"] == "failed" and f"the LoRA {loras['misfit']} does not fit model tiny" in misfit["reason"]
    assert "size mismatch" in misfit["reason"] and misfit["lora"] == str(loras["misfit"])
    assert "does not fit model tiny" in result.stderr and "Traceback" not in result.stderr


def test_folder_from_before_loras_renders_nothing_again(tmp_path, make_cfg, capsys):
    """A ledger written before the lora columns existed (and its plan) still reads; nothing is rendered again."""
    import pyarrow.parquet as pq
    from sdbatch.lease import remove_tree
    from sdbatch.run import run
    path = write_manifest(tmp_path / "catalog.parquet", {"id": ["x", "y"], "prompt": ["a red cat", "a blue dog"]})
    cfg = make_cfg(f"prompts={path}")
    assert run(cfg) == 0
    out = tmp_path / "out"
    ledger = out / "ledger" / "shard-00000.parquet"
    pq.write_table(pq.read_table(ledger).drop_columns(["lora", "lora_scale"]), ledger)
    remove_tree(out / "plans")  # plans of an older sdbatch have another plan format
    capsys.readouterr()
    assert run(cfg) == 0
    assert "0 images rendered" in capsys.readouterr().out
    rows = read_ledgers(out)
    assert [(r["id"], r["lora"], r["lora_scale"], r["status"]) for r in rows] == [
        ("x", None, None, "ok"), ("y", None, None, "ok")]


# ---------------------------------------------------------------- switching, in process
@pytest.fixture
def unet_call():
    """A fixed UNet input and text ids: call(model) -> (UNet output, text-encoder output)."""
    probe = tiny_model()
    torch.manual_seed(0)
    x, embeds, _ = random_unet_inputs(probe, 2, 64, 64)
    ids = torch.tensor([[0, 320, 1929, 2] + [1] * 73])

    @torch.no_grad()
    def call(model):
        return model.unet(x, torch.tensor(500), encoder_hidden_states=embeds).sample, model.text_encoders[0](ids)[0]
    return call


class Job:
    """What Adapters.activate reads of an ImageJob."""

    def __init__(self, path=None, scale=None):
        from sdbatch.weights import lora_fingerprint
        self.lora, self.lora_scale = (None, None) if path is None else (str(path), scale)
        self.lora_sha256 = None if path is None else lora_fingerprint(path)
        self.adapter = None if path is None else (self.lora_sha256, scale)


def test_slot_switching_matches_peft_adapters_and_never_recompiles(loras, unet_call, monkeypatch):
    from sdbatch import lora
    monkeypatch.setattr(lora, "CACHE_SIZE", 1)  # every switch to another LoRA loads it again
    jobs = [Job(loras["A"], 1.0), Job(loras["B"], 0.5), Job(), Job(loras["A"], 0.7)]
    eager_model, slot_model = tiny_model(), tiny_model()
    base = unet_call(eager_model)
    eager, slot = lora.Adapters(eager_model), lora.Adapters(slot_model, slot=True)
    slot.prepare({j.lora: j.lora_sha256 for j in jobs if j.lora})
    slot_model.unet = torch.compile(slot_model.unet, backend="eager", dynamic=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for job in jobs:
            eager.activate(job)
            slot.activate(job)
            want, got = unet_call(eager_model), unet_call(slot_model)
            assert torch.allclose(want[0], got[0], atol=1e-5) and torch.allclose(want[1], got[1], atol=1e-6)
            assert (job.lora is None) == torch.equal(want[0], base[0])
    assert not torch.equal(unet_call(eager_model)[1], base[1])  # A's text-encoder layers are on


def test_fused_projections_and_run_level_fusing_keep_the_lora(loras, unet_call):
    from sdbatch import lora
    reference = tiny_model()
    adapters = lora.Adapters(reference)
    adapters.activate(Job(loras["A"], 0.8))
    want = unet_call(reference)

    fused = tiny_model()
    fuse_projections(fused)  # fuse_qkv=true, as on a GPU; the LoRA's attention layers go back to separate Q/K/V
    lora.Adapters(fused).activate(Job(loras["A"], 0.8))
    assert torch.allclose(unet_call(fused)[0], want[0], atol=1e-5)

    merged = tiny_model()
    lora.fuse_run_loras(merged, [{"path": str(loras["A"]), "scale": 0.8}])
    assert not any("lora" in name for name, _ in merged.unet.named_parameters())  # plain weights for compile
    got = unet_call(merged)
    assert torch.allclose(got[0], want[0], atol=1e-4) and torch.allclose(got[1], want[1], atol=1e-4)

    from sdbatch import SdbatchError
    with pytest.raises(SdbatchError, match=r"lora\[1\]\.path=.*misfit.safetensors: the LoRA .* does not fit model "
                                           r"tiny: size mismatch"):
        lora.fuse_run_loras(tiny_model(), [{"path": str(loras["B"]), "scale": 1.0},
                                           {"path": str(loras["misfit"]), "scale": 1.0}])


def test_bench_lora_smoke(tmp_path):
    """scripts/bench_lora.py runs on a CPU with the tiny model (its numbers mean nothing there)."""
    import subprocess
    import sys
    from conftest import REPO
    out = tmp_path / "lora.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lora.py"), "--model", "tiny", "--steps", "2",
                           "--switches", "3", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eager"] and all(rows[0][k] > 0 for k in ("base_ms", "lora_ms", "switch_ms"))
    assert "| eager |" in done.stdout
