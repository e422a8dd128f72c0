"""GPU tests (run on the H200: `python -m pytest -m gpu`): every attention backend on full-size architectures."""

import importlib.util
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import peak_memory_gib
from sdbatch.models import random_model, random_unet_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None  # optional: scripts/gpu/setup.sh builds it
BACKENDS = ["vanilla", "sdpa", "xformers", "auto"] if HAS_XFORMERS else ["vanilla", "sdpa", "auto"]
NO_XFORMERS = pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed (scripts/gpu/setup.sh builds it)")
HAS_FLASH3 = importlib.util.find_spec("flash_attn_3") is not None  # optional: scripts/gpu/fa3.sh builds it
# the memory-efficient kernel set against the materialised scores: xformers', or else PyTorch's own
EFFICIENT = ("xformers", {"op": "cutlass"}) if HAS_XFORMERS else ("sdpa", {"kernel": "efficient"})
REL_TOLERANCE = 1e-2  # fp16 operands against an fp32 reference: measured errors sit near 1e-3


def choose(name, model, batch, size):
    cfg = OmegaConf.create({"name": name})
    return attention.choose(cfg, model, torch.device("cuda"), torch.float16, batch, size, size)


@pytest.mark.parametrize("arch,size", [("sd15", 512), ("sdxl", 1024)])
def test_every_backend_matches_an_fp32_reference(arch, size):
    model = random_model(arch).to(torch.device("cuda"), torch.float32)
    torch.manual_seed(0)
    x, embeds, added = random_unet_inputs(model, 2, size, size)
    t = torch.tensor(500, device="cuda")
    attention.apply(model, attention.Choice(("sdpa", {"kernel": "math"})))
    with torch.no_grad():
        reference = model.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    model.to(torch.device("cuda"), torch.float16)
    half = {k: v.half() for k, v in (added or {}).items()} or None
    errors = {}
    for name in BACKENDS:
        attention.apply(model, choose(name, model, 1, size))
        with torch.no_grad():
            out = model.unet(x.half(), t, encoder_hidden_states=embeds.half(), added_cond_kwargs=half).sample.float()
        assert torch.isfinite(out).all(), name
        errors[name] = ((out - reference).norm() / reference.norm()).item()
    print(arch, errors)
    assert all(e < REL_TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize("backend", ["vanilla", "sdpa", pytest.param("xformers", marks=NO_XFORMERS), "auto"])
def test_end_to_end_render_with_each_backend(tmp_path, backend):
    import pyarrow as pa
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a red chair", "a blue lamp", "a green mug"]}), manifest)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}", "model=sd15",
                           "model.random_weights=true", "steps=4", "width=256", "height=256", "batch_size=2",
                           f"attention={backend}", "progress=false"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "UserWarning" not in done.stderr, done.stderr  # torch's warnings for kernels sdbatch tries on purpose
    rows = pq.read_table(next((out / "ledger").glob("*.parquet"))).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    ran = {r["attention_backend"] for r in rows}
    assert ran == ({backend} if backend != "auto" else ran) and all(r["device"].startswith("cuda") for r in rows)
    from PIL import Image
    import numpy as np
    for row in rows:
        pixels = np.asarray(Image.open(out / row["image_path"]))
        assert pixels.shape == (256, 256, 3) and np.isfinite(pixels).all() and pixels.std() > 0


@pytest.mark.skipif(not (HAS_XFORMERS and HAS_FLASH3), reason="needs xformers and flash_attn_3 (scripts/gpu/fa3.sh)")
def test_flash3_runs_every_head_width_of_the_models_and_refuses_a_wider_one():
    """xformers' FlashAttention-3 operator on SD1.5's 40-, 80- and 160-wide heads (padded to the widths built) and
    SDXL's 64-wide ones, against fp32 attention; a head wider than the build has is an error, not a dead process."""
    cuda = torch.device("cuda")
    for shape in [(2, 4096, 4096, 8, 40), (2, 4096, 77, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160),
                  (2, 4096, 4096, 10, 64)]:
        q, kv = attention.random_qkv(shape, cuda, torch.float16)
        out = attention.xformers(q, kv, kv, {"op": "flash3"}).float()
        reference = attention.sdpa(q.float(), kv.float(), kv.float(), {"kernel": "math"})
        assert (out - reference).abs().max() < 5e-3, shape
    widest, _ = attention._flash3_build()
    if widest < 256:
        shape = (2, 64, 64, 4, widest + 8)
        assert math.isinf(attention.trial(("xformers", {"op": "flash3"}), shape, cuda, torch.float16))
        q, _ = attention.random_qkv(shape, cuda, torch.float16)
        with pytest.raises(ValueError, match=f"head widths up to {widest}"):
            attention.xformers(q, q, q, {"op": "flash3"})


@NO_XFORMERS
def test_xformers_checks_an_input_layout_once_then_gives_the_same_output_and_keeps_refusing_what_it_cannot_run():
    """Rendering skips xformers' per-call checks for inputs it already accepted (they cost more host time than the
    kernel): on a fused projection's strided views every operator gives the checked call's output bit for bit, and
    what an operator refuses it refuses every time."""
    cuda = torch.device("cuda")
    qkv = torch.randn(2, 1024, 3 * 8 * 40, device=cuda, dtype=torch.float16)
    q, k, v = (t.view(2, 1024, 8, 40) for t in qkv.chunk(3, dim=-1))
    reference = attention.sdpa(q.float(), k.float(), v.float(), {"kernel": "math"})
    for op in attention.xformers_ops():
        attention.XFORMERS_CHECKED.clear()
        checked = attention.xformers(q, k, v, {"op": op})
        assert (checked.float() - reference).abs().max() < 5e-3, op
        assert torch.equal(attention.xformers(q, k, v, {"op": op}), checked), op
        assert len(attention.XFORMERS_CHECKED) == 1, op
    wide = torch.randn(1, 64, 1, 512, device=cuda, dtype=torch.float16)  # FlashAttention-2 has no 512-wide kernel
    for _ in range(2):
        with pytest.raises(ValueError):
            attention.xformers(wide, wide, wide, {"op": "flash"})


def test_compiling_each_block_renders_what_compiling_the_whole_model_does(tmp_path):
    """compile_scope=blocks against the default whole-model compile: same rows, same pixels to within rounding
    (the kernels fuse differently), no Dynamo recompile-limit warning (every block shape has its cache entry), and
    the compile cache in the run's folder, where other hosts' array tasks find it."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a red chair", "a blue lamp", "a green mug"]}), manifest)
    images = {}
    for scope in ("model", "blocks"):
        out = tmp_path / scope
        done = subprocess.run([sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}",
                               "model=tiny", "steps=4", "batch_size=2", "compile=true", f"compile_scope={scope}",
                               "progress=false"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "recompile_limit" not in done.stderr, done.stderr[-3000:]
        assert list((out / ".cache" / "torch" / "inductor").rglob("*.py")), "the compile cache is elsewhere"
        rows = sorted(pq.read_table(next((out / "ledger").glob("*.parquet"))).to_pylist(), key=lambda r: r["prompt"])
        assert [r["status"] for r in rows] == ["ok"] * 3
        images[scope] = [np.asarray(Image.open(out / r["image_path"]), dtype=np.int16) for r in rows]
    for whole, blocks in zip(images["model"], images["blocks"]):
        assert np.abs(whole - blocks).max() <= 8, np.abs(whole - blocks).max()


def test_a_new_process_loads_the_saved_compile_and_renders_what_torch_compile_does(tmp_path):
    """compile_engine=aot: the first run compiles the UNet and the decoder and saves them in the compile cache; a
    second process loads them without tracing and renders the same pixels; torch.compile (`jit`) renders them to
    within rounding."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a red chair", "a blue lamp", "a green mug"]}), manifest)
    images = {}
    for name, engine in (("cold", "aot"), ("warm", "aot"), ("jit", "jit")):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}",
                               "model=tiny", "steps=4", "batch_size=2", "compile=true", f"compile_engine={engine}",
                               f"compile_cache={tmp_path / 'cache'}", "progress=false"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "cold":
            assert done.stderr.count("ahead of time for") == 2, done.stderr[-3000:]  # the UNet and the decoder
        if name == "warm":
            assert "ahead of time" not in done.stderr, done.stderr[-3000:]
            assert done.stderr.count("loaded the compiled") == 2, done.stderr[-3000:]
        rows = sorted(pq.read_table(next((out / "ledger").glob("*.parquet"))).to_pylist(), key=lambda r: r["prompt"])
        assert [r["status"] for r in rows] == ["ok"] * 3
        images[name] = [np.asarray(Image.open(out / r["image_path"]), dtype=np.int16) for r in rows]
    for cold, warm, jit in zip(images["cold"], images["warm"], images["jit"]):
        assert np.array_equal(cold, warm)
        assert np.abs(cold - jit).max() <= 8, np.abs(cold - jit).max()


def test_vanilla_memory_grows_quadratically_memory_efficient_attention_linearly():
    """SD2.1 UNet at 768x768 (9216 self-attention tokens) against 384x384 (2304 tokens), batch 8."""
    model = random_model("sd21").to(torch.device("cuda"), torch.float16)
    t = torch.tensor(500, device="cuda")
    peaks = {}
    for name, variant in (("vanilla", ("vanilla", {})), ("fused", EFFICIENT)):
        attention.apply(model, attention.Choice(variant))
        for size in (384, 768):
            x, embeds, added = random_unet_inputs(model, 8, size, size)
            with torch.no_grad():
                peaks[name, size] = peak_memory_gib(lambda: model.unet(x, t, encoder_hidden_states=embeds))
    print({f"{k[0]}@{k[1]}": round(v, 2) for k, v in peaks.items()})
    weights = sum(p.numel() * p.element_size() for p in model.unet.parameters()) / 2 ** 30
    # 4x the tokens: the materialised score matrices grow 16x; everything the fused kernel keeps grows at most 4x.
    scores_growth = (peaks["vanilla", 768] - peaks["fused", 768]) / (peaks["vanilla", 384] - peaks["fused", 384])
    fused_growth = (peaks["fused", 768] - weights) / (peaks["fused", 384] - weights)
    assert peaks["vanilla", 768] > 2 * peaks["fused", 768]
    assert scores_growth > 10 and fused_growth <= 4, (scores_growth, fused_growth)
