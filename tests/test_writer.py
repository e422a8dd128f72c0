"""Image formats and their metadata: round trips, what AUTOMATIC1111 reads back, partial and foreign files."""

import io
import json
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import compose_config
from sdbatch import SdbatchError
from sdbatch.lease import Holder, Lease
from sdbatch.writer import (JPEG_EXTENDED_XMP, JPEG_SEGMENT, ImageFormat, ImageWriter, a1111_parameters,
                            encode_png, image_name, read_parameters, read_provenance)

FORMATS = {"png": ImageFormat(), "webp": ImageFormat("webp"), "webp-lossless": ImageFormat("webp", lossless=True),
           "jpeg": ImageFormat("jpeg")}
LOSSLESS = {"png", "webp-lossless"}
PROVENANCE = {"model": "tiny", "seed": 42, "prompt": "猫 on a sofa, שלום עולם 🐱‍👤 café",
              "tricky": "& < > ]]> \" ' \x00 \x1f \x7f \u2028 \ufeff \ufffe \uffff \U0001f600",
              "manifest_row": {"id": "a/b", "description": "x" * 3000}, "nested": [1, 2.5, None, True]}


def pixels(height=64, width=96) -> np.ndarray:
    """A smooth image with a little texture, like a rendering (random noise would be unfair to lossy formats)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 5) * np.cos(y / 7)], axis=-1)
    return image.round().astype(np.uint8)


def parameters(prompt="a red cat on a sofa", negative_prompt="blurry", model="tiny") -> str:
    return a1111_parameters(prompt, negative_prompt, 20, "PNDM", 7.5, 42, 96, 64, model)


def lease() -> Lease:
    """A held lease in a folder of its own: images are staged in it and renamed into place, as a worker does."""
    held = Lease(Path(tempfile.mkdtemp(prefix="sdbatch-lease-")) / "shard-00000", Holder.this_process("test"), 60)
    assert held.acquire() is None
    return held


def write(tmp_path, name, image_format, text=None, provenance=PROVENANCE):
    path = tmp_path / image_name("a/b", 0, image_format.suffix)
    path = path.with_name(f"{name}-{path.name}")
    writer = ImageWriter(1, image_format)
    writer.submit(path, pixels(), text or parameters(), provenance, lease()).result()
    writer.close()
    return path


# ---------------------------------------------------------------- AUTOMATIC1111's readers, ported
# parse_generation_parameters (the part that splits prompt, negative prompt and settings), re_param and unquote:
# AUTOMATIC1111/stable-diffusion-webui, modules/infotext_utils.py (commit c19d0443; generation_parameters_copypaste.py
# before). Styles, hypernetworks and the defaults it fills in afterwards are left out.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for k, v in RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = a1111_unquote(v)
            m = RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def a1111_read_info(path) -> str | None:
    """read_info_from_image's geninfo (modules/images.py): PNG `parameters`, else the EXIF UserComment via piexif."""
    with Image.open(path) as image:
        items = (image.info or {}).copy()
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        exif = piexif.load(items["exif"])
        exif_comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        try:
            exif_comment = piexif.helper.UserComment.load(exif_comment)
        except ValueError:
            exif_comment = exif_comment.decode("utf8", errors="ignore")
        if exif_comment:
            geninfo = exif_comment
    return geninfo


def a1111_save(path, image_format: str, text: str) -> None:
    """How A1111's save_image_with_geninfo writes a JPEG or WebP: save, then piexif.insert the UserComment."""
    Image.fromarray(pixels()).save(path, format=image_format, quality=80)
    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}}), str(path))


# ---------------------------------------------------------------- formats
def test_png_is_byte_for_byte_what_it_was():
    info = PngInfo()  # the encoder as it was before other formats came
    info.add_itxt("parameters", parameters())
    info.add_itxt("sdbatch", json.dumps(PROVENANCE, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    Image.fromarray(pixels()).save(buffer, format="PNG", pnginfo=info, compress_level=1)
    assert ImageFormat().encode(pixels(), parameters(), PROVENANCE) == buffer.getvalue()
    assert encode_png(pixels(), parameters(), PROVENANCE) == buffer.getvalue()
    assert ImageWriter(1).image_format == ImageFormat("png", 90, False)


def test_file_names_keep_their_png_name_and_swap_only_the_suffix():
    assert image_name("a/b", 0) == image_name("a/b", 0, ".png") == "a_b-c14cddc033f6_0.png"
    assert image_name("catalog-42", 3) == "catalog-42-9fb1e5f1de7f_3.png"
    assert [image_name("a/b", 0, f.suffix) for f in FORMATS.values()] == [
        "a_b-c14cddc033f6_0.png", "a_b-c14cddc033f6_0.webp", "a_b-c14cddc033f6_0.webp", "a_b-c14cddc033f6_0.jpg"]


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip(tmp_path, name):
    image_format = FORMATS[name]
    text = parameters("猫 on a sofa 🐱\nשלום עולם", "ugly 😡")
    path = write(tmp_path, name, image_format, text)
    assert path.suffix == image_format.suffix
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[image_format.name]
        decoded = np.asarray(image.convert("RGB"))
    if name in LOSSLESS:
        assert np.array_equal(decoded, pixels())
    else:
        assert np.abs(decoded.astype(int) - pixels()).mean() < 2.0
    assert read_provenance(path) == PROVENANCE
    assert read_parameters(path) == text


@pytest.mark.parametrize("name", FORMATS)
def test_a1111_reads_the_parameters(tmp_path, name):
    text = parameters("a cat 🐱\non a sofa", "blurry", model="my model, v2")
    path = write(tmp_path, name, FORMATS[name], text)
    assert a1111_read_info(path) == text
    parsed = parse_generation_parameters(a1111_read_info(path))
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a cat 🐱\non a sofa", "blurry")
    assert {k: parsed[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model")} == {
        "Steps": "20", "Sampler": "PNDM", "CFG scale": "7.5", "Seed": "42", "Size-1": "96", "Size-2": "64",
        "Model": "my model, v2"}


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP"])
def test_parameters_of_files_a1111_wrote_are_read(tmp_path, image_format):
    path = tmp_path / f"a1111.{image_format.lower()}"
    a1111_save(path, image_format, parameters("猫 🐱"))
    assert read_parameters(path) == parameters("猫 🐱")
    assert read_provenance(path) is None  # not ours


# ---------------------------------------------------------------- the A1111 text parses back
TRICKY = {  # prompt, negative prompt -> what A1111's parser gets back
    "plain": (("a red cat", ""), ("a red cat", "")),
    "multi-line": (("a cat\non a sofa\n\nat night\n", "blurry\n\nlow quality"),
                   ("a cat\non a sofa\n\nat night\n", "blurry\n\nlow quality")),
    "ends like settings": (("a cat, Steps: 3", ""), ("a cat, Steps: 3", "")),
    "last line is settings": (("a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1", "dog"),
                              ("a cat\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1", "dog")),
    "unicode, RTL, emoji": (("猫 \u200fשלום עולם\u200f 🐱‍👤 café", "ugly 😡"),
                            ("猫 \u200fשלום עולם\u200f 🐱‍👤 café", "ugly 😡")),
    "negative opens with its label": (("a cat", "Negative prompt: dog"), ("a cat", "Negative prompt: dog")),
    # a line opening with "Negative prompt:" would start (or restart) the negative prompt: its N is lowercased
    "prompt line opens with label": (("a cat\nNegative prompt: not really\nsofa", ""),
                                     ("a cat\nnegative prompt: not really\nsofa", "")),
    "prompt opens with label": (("Negative prompt: a cat", "dog"), ("negative prompt: a cat", "dog")),
    "indented label": (("a cat\n  Negative prompt: x", "dog"), ("a cat\nnegative prompt: x", "dog")),
    "negative line opens with label": (("a cat", "dog\nNegative prompt: wolf"),
                                       ("a cat", "dog\nnegative prompt: wolf")),
    # A1111 strips every line, so whitespace at line ends (Windows line ends included) cannot come back
    "whitespace at line ends": (("  a cat \r\n on a sofa\t", " dog "), ("a cat\non a sofa", "dog")),
}


@pytest.mark.parametrize("case", TRICKY)
def test_a1111_text_parses_back(case):
    (prompt, negative), expected = TRICKY[case]
    text = a1111_parameters(prompt, negative, 3, "DPM++ 2M", 7.5, 42, 512, 768, "sd15")
    parsed = parse_generation_parameters(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == expected
    assert (parsed["Steps"], parsed["Sampler"], parsed["Seed"], parsed["Size-1"], parsed["Size-2"]) == (
        "3", "DPM++ 2M", "42", "512", "768")
    assert prompt.lower().split() == parsed["Prompt"].lower().split()  # what CLIP's tokenizers see is the same


def test_ordinary_parameters_text_is_unchanged():
    assert parameters() == ("a red cat on a sofa\nNegative prompt: blurry\n"
                            "Steps: 20, Sampler: PNDM, CFG scale: 7.5, Seed: 42, Size: 96x64, Model: tiny")
    assert parameters(negative_prompt="", model="a:b") == (
        'a red cat on a sofa\nSteps: 20, Sampler: PNDM, CFG scale: 7.5, Seed: 42, Size: 96x64, Model: "a:b"')


# ---------------------------------------------------------------- partial, foreign and missing files
@pytest.mark.parametrize("name", FORMATS)
def test_partial_files_are_not_read(tmp_path, name):
    path = write(tmp_path, name, FORMATS[name])
    data = path.read_bytes()
    for cut in (1, 2, 12, 100, len(data) // 2, len(data) - 10):
        partial = tmp_path / f"cut-{cut}{path.suffix}"
        partial.write_bytes(data[:-cut])
        assert read_provenance(partial) is None, cut
        assert read_parameters(partial) is None, cut


def test_missing_and_foreign_files_read_as_none(tmp_path):
    foreign = {"missing.png": None, "empty.png": b"", "text.jpg": b"not an image",
               "plain.png": None, "plain.jpg": None, "plain.webp": None}
    for name, data in foreign.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        elif name.startswith("plain"):
            Image.fromarray(pixels()).save(path)
        assert read_provenance(path) is None, name
        assert read_parameters(path) is None, name
    not_json = tmp_path / "not-json.png"
    info = PngInfo()
    info.add_itxt("sdbatch", "[1, 2]")
    Image.fromarray(pixels()).save(not_json, pnginfo=info)
    assert read_provenance(not_json) is None


# ---------------------------------------------------------------- JPEG's 64 KiB segments
def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment before the image data; fails on a length that runs off the file."""
    segments, at = [], 2
    while data[at + 1] != 0xDA:  # start of scan
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        assert at + 2 + length < len(data)
        segments.append((data[at + 1], data[at + 4:at + 2 + length]))
        at += 2 + length
    return segments


def test_oversized_provenance_goes_to_extended_xmp_in_jpeg(tmp_path):
    provenance = {**PROVENANCE, "description": "猫 café 🐱 " * 20000}  # about 300 KB of XMP
    path = write(tmp_path, "big", ImageFormat("jpeg"), provenance=provenance)
    extended = [p for marker, p in jpeg_segments(path.read_bytes()) if p.startswith(JPEG_EXTENDED_XMP)]
    assert len(extended) == 5
    assert all(len(p) <= JPEG_SEGMENT for p in extended)
    assert read_provenance(path) == provenance
    assert read_parameters(path) == parameters()
    assert a1111_read_info(path) == parameters()

    data = path.read_bytes()  # one chunk lost: the provenance is not read, never half of it
    chunk = data.index(JPEG_EXTENDED_XMP) - 4
    length = struct.unpack(">H", data[chunk + 2:chunk + 4])[0]
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(data[:chunk] + data[chunk + 2 + length:])
    assert read_provenance(damaged) is None
    assert read_parameters(damaged) == parameters()


def test_parameters_too_long_for_jpeg_fail_plainly_and_write_nothing(tmp_path):
    text = parameters("a cat " * 6000)  # 36,000 characters: 72 KB of UTF-16
    writer = ImageWriter(1, ImageFormat("jpeg"))
    path = tmp_path / "too-long.jpg"
    with pytest.raises(SdbatchError, match="image_format=webp or image_format=png"):
        writer.submit(path, pixels(), text, PROVENANCE, lease()).result()
    writer.close()
    assert list(tmp_path.iterdir()) == []
    assert read_parameters(write(tmp_path, "webp", ImageFormat("webp"), text)) == text


# ---------------------------------------------------------------- configuration
def test_format_comes_from_the_config():
    assert ImageFormat.from_config(compose_config()) == ImageFormat("png", 90, False)
    cfg = compose_config("image_format=webp", "image_quality=75", "image_lossless=true")
    assert ImageFormat.from_config(cfg) == ImageFormat("webp", 75, True)


@pytest.mark.parametrize("arguments, message", [
    (("gif",), "image_format=gif is not a format sdbatch writes: choose one of png, webp, jpeg"),
    (("jpg",), "choose one of png, webp, jpeg"),
    (("jpeg", 0), "image_quality=0 is not a quality: give a whole number from 1 to 100"),
    (("webp", 101), "image_quality=101"),
    (("webp", 90.5), "image_quality=90.5"),
    (("webp", True), "image_quality=True"),
    (("jpeg", 90, True), "image_lossless=True does not apply to image_format=jpeg"),
    (("png", 90, True), "true only with image_format=webp"),
    (("webp", 90, "yes"), "image_lossless=yes"),
])
def test_bad_format_settings_are_explained(arguments, message):
    with pytest.raises(SdbatchError, match=re.escape(message)):
        ImageFormat(*arguments)
