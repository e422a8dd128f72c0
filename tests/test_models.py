"""Real weights: diffusers folders and single-file checkpoints load and render alike; pickles and bad paths are refused
in one paragraph; the weights' fingerprint follows their content."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, cli, compose_config, read_ledgers, write_manifest
from sdbatch import SdbatchError, weights
from sdbatch.manifest import ImageJob
from sdbatch.models import (TINY_REVISION, assign, clip_tokenizer, load_model, model_revision, text_encoder_states,
                            tiny_model, window_ids)
from sdbatch.render import Renderer, make_scheduler
from sdbatch.run import run


def save_diffusers_folder(folder, family: str, safe: bool = True):
    """The tiny model saved in the layout of a diffusers model repository (what snapshot_download gives)."""
    model = tiny_model(family)
    model.unet.save_pretrained(folder / "unet", safe_serialization=safe)
    model.vae.save_pretrained(folder / "vae", safe_serialization=safe)
    suffixes = ["", "_2"] if family == "sdxl" else [""]
    for suffix, encoder, tokenizer in zip(suffixes, model.text_encoders, model.tokenizers):
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=safe)
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    make_scheduler(compose_config().scheduler, model.scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def pixels(output_dir) -> dict:
    return {(r["id"], r["image_index"]): np.asarray(Image.open(output_dir / r["image_path"]), np.int16)
            for r in read_ledgers(output_dir)}


@pytest.mark.parametrize("model_name, family", [("sd15", "sd"), ("sdxl", "sdxl")])
def test_pretrained_folder_renders_like_the_same_weights_in_memory(tmp_path, model_name, family):
    weights = save_diffusers_folder(tmp_path / "weights", family)
    assert list((weights / "unet").glob("*.safetensors"))
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": ["a red cat", "a blue dog"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", f"model={model_name}",
                 f"model.path={weights}", "width=64", "height=64", "steps=2")
    assert result.returncode == 0, result.stderr
    assert "2 images rendered (0 failed)" in result.stdout
    rows = read_ledgers(tmp_path / "out")
    assert [r["model"] for r in rows] == [model_name] * 2 and all(r["status"] == "ok" for r in rows)

    # the same weights built in memory (model=tiny) give the same pixels: loading lost nothing
    assert run(compose_config("model=tiny", f"model.family={family}", "steps=2", "progress=false",
                              f"prompts={tmp_path / 'catalog.parquet'}", f"output_dir={tmp_path / 'ref'}")) == 0
    loaded, reference = pixels(tmp_path / "out"), pixels(tmp_path / "ref")
    assert loaded.keys() == reference.keys()
    for key in loaded:
        assert np.abs(loaded[key] - reference[key]).max() <= 1, key


def test_pickle_weights_are_refused(tmp_path):
    weights = save_diffusers_folder(tmp_path / "weights", "sd", safe=False)
    unet_files = [p.suffix for p in (weights / "unet").iterdir()]
    assert ".bin" in unet_files and ".safetensors" not in unet_files  # (transformers may still save safetensors)
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=sd15", f"model.path={weights}",
                 "width=64", "height=64")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "pickle" in result.stderr and "safetensors" in result.stderr and str(weights / "unet") in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- single-file checkpoints (original LDM layout)
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet key in the original repository's layout (what diffusers' convert_ldm_unet_checkpoint undoes)."""
    n = config["layers_per_block"] + 1  # input/output blocks per resolution
    for old, new in UNET_TOP_LDM.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    resnet = lambda rest: ".".join([RESNET_LDM.get(rest.split(".")[0], rest.split(".")[0]), *rest.split(".")[1:]])  # noqa: E731
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{b * n + j + 1}." + (f"0.{resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * n + j}." + (f"0.{resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1  # after the attention, when there is one
        return f"output_blocks.{b * n + n - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def ldm_vae(state: dict, config) -> dict:
    """A diffusers VAE state dict in the original layout (1x1 convolutions for the mid-block attention)."""
    ups, out = len(config["up_block_types"]), {}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{ups - 1 - int(m[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{ups - 1 - int(m[1])}.upsample", new)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]
        out[new] = value
    return out


def ldm_clip(state: dict) -> dict:
    """A transformers CLIPTextModel state dict as the original checkpoints hold it (under text_model.)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()
            if not k.endswith("position_ids")}


def ldm_open_clip(state: dict) -> dict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused in_proj, transposed text_projection)."""
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out, qkv = {}, {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = value
        elif k == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", k):
            out[f"transformer.resblocks.{m[1]}.{names[m[2]]}.{m[3]}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def save_single_file(path, family: str):
    """The tiny model as an A1111/civitai single-file checkpoint (plus keys real ones carry and loaders ignore)."""
    from safetensors.torch import save_file

    model = tiny_model(family)
    state = {f"model.diffusion_model.{ldm_unet_key(k, model.unet.config)}": v for k, v in model.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in ldm_vae(model.vae.state_dict(), model.vae.config).items()}
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    if family == "sd":
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in ldm_clip(model.text_encoders[0].state_dict()).items()}
    else:
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in ldm_clip(model.text_encoders[0].state_dict()).items()}
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in ldm_open_clip(model.text_encoders[1].state_dict()).items()}
        state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def loaded(make_cfg, path, family: str):
    return load_model(make_cfg("model.random_weights=false", f"model.path={path}", f"model.family={family}").model)


def render_pixels(model, prompts) -> list:
    jobs = [ImageJob(id=str(i), image_index=0, prompt=p, negative_prompt="blurry", seed=i, width=64, height=64,
                     steps=2, guidance_scale=7.5, extra={}) for i, p in enumerate(prompts)]
    return [p.numpy().astype(np.int16) for p in Renderer(model, compose_config().scheduler).render(jobs).pixels]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_checkpoint_loads_like_the_diffusers_folder(tmp_path, make_cfg, family):
    folder = save_diffusers_folder(tmp_path / "folder", family)
    single = save_single_file(tmp_path / "tiny.safetensors", family)
    from_folder, from_file = loaded(make_cfg, folder, family), loaded(make_cfg, single, family)
    assert from_file.revision.startswith(f"{single} sha256:") and from_folder.revision.startswith(f"{folder} sha256:")

    pairs = [(from_folder.unet, from_file.unet), (from_folder.vae, from_file.vae), *zip(from_folder.text_encoders, from_file.text_encoders)]
    for a, b in pairs:  # every weight arrived, unchanged
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), type(a).__name__
    assert [t.pad_token for t in from_file.tokenizers] == [t.pad_token for t in from_folder.tokenizers]
    prompts = ["a red cat on a sofa", "word " * 100]
    for a, b in zip(render_pixels(from_folder, prompts), render_pixels(from_file, prompts)):
        assert np.abs(a - b).max() <= 1 and a.std() > 1


def test_single_file_of_another_architecture_is_refused(tmp_path, make_cfg):
    single = save_single_file(tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(SdbatchError) as caught:
        model_revision(make_cfg("model.random_weights=false", f"model.path={single}").model)  # tiny SD
    assert_paragraph(caught, str(single), "an SDXL checkpoint", "conditioner.embedders.1.model.", "model=sdxl")



def test_sd2_open_clip_text_encoder_converts(make_cfg):
    """SD 2.x keeps its OpenCLIP encoder under cond_stage_model.model. (no tiny SD 2 architecture: the encoder alone)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    original = CLIPTextModel(config).eval()
    checkpoint = {f"cond_stage_model.model.{k}": v for k, v in ldm_open_clip(original.state_dict()).items()}
    with torch.device("meta"):
        encoder = CLIPTextModel(config)
    [state] = text_encoder_states(checkpoint, [encoder], "sd2")
    assign(encoder, state, "text encoder", "sd2.safetensors", "sd21")
    ids = torch.tensor([window_ids(clip_tokenizer("!"), [320, 1125, 539, 320, 2368])])
    with torch.no_grad():
        assert torch.allclose(encoder(ids)[0], original(ids)[0], atol=1e-6)


# ---------------------------------------------------------------- model.path errors: one plain paragraph each
def assert_paragraph(caught, *needles):
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def path_error(make_cfg, path, *overrides) -> pytest.ExceptionInfo:
    cfg = make_cfg("model.random_weights=false", f"model.path={path}", *overrides).model
    with pytest.raises(SdbatchError) as caught:
        model_revision(cfg)
    with pytest.raises(SdbatchError) as again:
        load_model(cfg)
    assert str(again.value) == str(caught.value)  # the same check before and at loading
    return caught


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoint_is_refused(tmp_path, make_cfg, suffix):
    path = tmp_path / f"v1-5-pruned-emaonly{suffix}"
    path.write_bytes(b"\x80\x04not loaded")
    assert_paragraph(path_error(make_cfg, path), str(path), "pickle", "safetensors", "run")


def test_model_path_errors(tmp_path, make_cfg):
    missing = tmp_path / "nowhere"
    assert_paragraph(path_error(make_cfg, missing), str(missing), "does not exist", "diffusers model folder", ".safetensors")
    assert_paragraph(path_error(make_cfg, "nobody/no-such-model"), "nobody/no-such-model", "Hugging Face cache")

    (tmp_path / "empty").mkdir()
    assert_paragraph(path_error(make_cfg, tmp_path / "empty"), "empty folder", "diffusers model folder")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert_paragraph(path_error(make_cfg, gguf), str(gguf), ".gguf file", ".safetensors checkpoint")

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_paragraph(path_error(make_cfg, broken), str(broken), "not a valid safetensors file")

    from safetensors.torch import save_file
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({"conv_in.weight": torch.zeros(2)}, str(unet_only))
    assert_paragraph(path_error(make_cfg, unet_only), str(unet_only), "no UNet", "no VAE", "no text encoder", "conv_in")

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    save_file({"x": torch.zeros(1)}, str(downloads / "model.safetensors"))
    assert_paragraph(path_error(make_cfg, downloads), "not a diffusers model folder", "model.safetensors",
                     f"model.path={downloads / 'model.safetensors'}")

    folder = save_diffusers_folder(tmp_path / "weights", "sdxl")
    shutil.rmtree(folder / "vae")
    assert_paragraph(path_error(make_cfg, folder, "model.family=sdxl"), str(folder), "without vae/", "unet/")
    shutil.rmtree(folder / "tokenizer_2")
    assert_paragraph(path_error(make_cfg, folder, "model.family=sdxl"), "without vae/, tokenizer_2/")
    save_diffusers_folder(tmp_path / "weights", "sd")
    (folder / "text_encoder" / "config.json").unlink()
    assert_paragraph(path_error(make_cfg, folder), str(folder / "text_encoder"), "config.json")


# ---------------------------------------------------------------- what identifies the weights
def test_fingerprint_follows_the_content_not_the_path_or_mtime(tmp_path, make_cfg, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = save_diffusers_folder(tmp_path / "weights", "sd")
    (tmp_path / "link").symlink_to(folder)
    revision = lambda path: model_revision(make_cfg("model.random_weights=false", f"model.path={path}").model)  # noqa: E731
    first = revision(folder)
    assert first.startswith(f"{folder.resolve()} sha256:")
    monkeypatch.chdir(tmp_path)
    assert revision("weights") == revision("./weights/") == revision(tmp_path / "link") == first
    weights_file = next((folder / "unet").glob("*.safetensors"))
    os.utime(weights_file, (0, 0))
    assert revision(folder) == first  # mtimes are not content

    state = load_file(weights_file)
    name = sorted(state)[len(state) // 2]
    state[name] = state[name] + 1  # same size, same header, new values
    save_file(state, str(weights_file))
    assert revision(folder) != first

    single = save_single_file(tmp_path / "tiny.safetensors", "sd")
    assert revision(single) == revision(tmp_path / "." / "tiny.safetensors") != revision(folder)
    assert revision(single).startswith(f"{single} sha256:")
    assert model_revision(make_cfg().model) == TINY_REVISION["sd"]
    assert model_revision(make_cfg("model.family=sdxl").model) == TINY_REVISION["sdxl"] == tiny_model("sdxl").revision


def test_fingerprint_reads_megabytes_not_the_weights(tmp_path):
    import json as json_
    import struct

    tensors = {f"t{i}": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [i << 22, (i + 1) << 22]} for i in range(64)}
    header = json_.dumps(tensors).encode()
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:  # 256 MiB of tensors, written sparsely
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (64 << 22))
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

    import builtins
    from unittest import mock
    with mock.patch.object(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k))):
        digest = weights.fingerprint(big)
    assert sum(reads) < 2 << 20 and digest == weights.fingerprint(big)


def test_weights_module_does_not_import_torch():
    code = "import sys, sdbatch.weights; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode == 0


def test_shipped_clip_vocabulary_gives_clips_token_ids():
    tokenizer = clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer("!").pad_token_id == 0 and tokenizer.pad_token_id == 49407


def test_a_folder_made_by_the_first_sdbatch_keeps_its_model_identity_until_the_weights_change(tmp_path, make_cfg):
    """The first sdbatch identified weights by the path given. Such a folder keeps that identity (so its content
    keys, and its images, stay valid); the fingerprint now recorded beside it catches new weights later."""
    from safetensors.torch import load_file, save_file

    from sdbatch.ledger import open_folder
    from sdbatch.run import model_identity
    weights = save_diffusers_folder(tmp_path / "weights", "sd")
    out = tmp_path / "out"
    out.mkdir()
    legacy = {"model": str(weights), "scheduler": "pndm", "steps": 2}
    (out / "sdbatch.json").write_text(json.dumps({"num_shards": 1, "settings": legacy}))
    cfg = make_cfg("model=sd15", f"model.path={weights}", "prompts=x")
    identity = model_identity(cfg.model, out)
    assert identity["model"] == str(weights) and identity["weights"].startswith(f"{weights.resolve()} sha256:")
    assert open_folder(out, {**legacy, **identity}, 1, False, 1000) == 1  # accepted, and the fingerprint recorded
    assert json.loads((out / "sdbatch.json").read_text())["settings"]["weights"] == identity["weights"]

    unet = next((weights / "unet").glob("*.safetensors"))  # retrained weights saved over the old ones
    state = load_file(unet)
    state = {k: v + 1e-3 if i == 0 else v for i, (k, v) in enumerate(state.items())}
    save_file(state, unet)
    changed = model_identity(cfg.model, out)
    assert changed["model"] != str(weights) and "weights" not in changed
    with pytest.raises(SdbatchError, match="overwrite=true"):
        open_folder(out, {**legacy, **changed}, 1, False, 1000)
