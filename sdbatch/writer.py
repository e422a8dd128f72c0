"""Image files (PNG, WebP, JPEG) with generation metadata, written atomically on a thread pool that overlaps the GPU."""

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdbatch import SdbatchError

PROVENANCE_KEY = "sdbatch"  # the PNG text chunk holding the JSON provenance (and the ledger row)
TEMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)  # read once at import (os.umask sets it too, so it is not safe on writer threads)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's 0600 would hide outputs from the rest of a team

SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
# EXIF UserComment as A1111 writes it (piexif.helper.UserComment.dump(text, encoding="unicode")): 8-byte charset
# code, then UTF-16 big-endian. A1111 and the tools copying it read the comment from the Exif IFD with piexif.
EXIF_IFD, USER_COMMENT, UNICODE_CODE = 0x8769, 0x9286, b"UNICODE\x00"
XMP_NS = "urn:sdbatch:1.0/"  # the XMP namespace of sdbatch:provenance
XMP_NOTE_NS = "http://ns.adobe.com/xmp/note/"  # Adobe's, for xmpNote:HasExtendedXMP
JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
JPEG_EXTENDED_XMP = b"http://ns.adobe.com/xmp/extension/\x00"
JPEG_SEGMENT = 65533  # the most bytes a JPEG APP segment holds after its 2-byte length
EXTENDED_CHUNK = JPEG_SEGMENT - len(JPEG_EXTENDED_XMP) - 32 - 8  # after the GUID, full length and offset
_NEGATIVE_LINE = re.compile(r"(?<=\n)(\s*)Negative prompt:")  # a line A1111's parser would take for the negative


def image_name(row_id: str, image_index: int, suffix: str = ".png") -> str:
    """A safe, stable, collision-free file name for an id: readable slug + hash of the exact id."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id).strip("._")[:60] or "id"
    digest = hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}_{image_index}{suffix}"


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance_scale: float,
                     seed: int, width: int, height: int, model: str) -> str:
    """The `parameters` text every SD tool reads (AUTOMATIC1111's format).

    A1111's parse_generation_parameters gets the prompt and negative prompt back exactly, except for whitespace at
    the ends of their lines (it strips each line) and a line inside them opening with "Negative prompt:", where it
    would start or restart the negative prompt: that line's N is lowercased, which CLIP's tokenizers do anyway.
    """
    lines = [_no_negative_lines("\n" + prompt)[1:]]  # the prompt's first line counts too
    if negative_prompt:
        lines.append(f"Negative prompt: {_no_negative_lines(negative_prompt)}")  # its first line follows the label
    lines.append(f"Steps: {steps}, Sampler: {_a1111_value(sampler)}, CFG scale: {guidance_scale:g}, Seed: {seed}, "
                 f"Size: {width}x{height}, Model: {_a1111_value(model)}")
    return "\n".join(lines)


def _no_negative_lines(text: str) -> str:
    return _NEGATIVE_LINE.sub(r"\1negative prompt:", text)


def _a1111_value(value: str) -> str:
    """A value of the settings line, quoted as A1111's own quote() does (a comma or newline would split the line)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def encode_png(pixels: np.ndarray, parameters: str, provenance: dict) -> bytes:
    info = PngInfo()
    info.add_itxt("parameters", parameters)
    info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def exif_user_comment(text: str) -> bytes:
    """A big-endian EXIF block holding only the Exif IFD's UserComment: the tag, type and byte order A1111 writes."""
    comment = UNICODE_CODE + text.encode("utf-16-be")
    ifd0 = struct.pack(">HHHIII", 1, EXIF_IFD, 4, 1, 26, 0)  # one entry: where the Exif IFD starts; no next IFD
    exif_ifd = struct.pack(">HHHIII", 1, USER_COMMENT, 7, len(comment), 44, 0)  # 7: UNDEFINED bytes, at 44
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def provenance_xmp(provenance: dict) -> bytes:
    """An XMP packet whose sdbatch:provenance is the JSON provenance (UTF-8, as readable as the PNG chunk)."""
    text = json.dumps(provenance, ensure_ascii=False, default=str)
    text = re.sub("[\ufffe\uffff]", lambda m: f"\\u{ord(m.group()):04x}", text)  # not XML characters; same JSON
    return _xmp_packet(f"<sdbatch:provenance>{escape(text)}</sdbatch:provenance>")


def _xmp_packet(element: str) -> bytes:
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:sdbatch="{XMP_NS}" xmlns:xmpNote="{XMP_NOTE_NS}">{element}'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def jpeg_xmp_segments(packet: bytes) -> bytes:
    """APP1 segments holding an XMP packet of any size: one when it fits, else Adobe's Extended XMP (XMP spec part 3,
    1.1.3.1), a standard packet naming the MD5 of the full one, which follows in chunks exiftool and Adobe join."""
    if len(JPEG_XMP) + len(packet) <= JPEG_SEGMENT:
        return _app1(JPEG_XMP + packet)
    guid = hashlib.md5(packet, usedforsecurity=False).hexdigest().upper()
    segments = _app1(JPEG_XMP + _xmp_packet(f"<xmpNote:HasExtendedXMP>{guid}</xmpNote:HasExtendedXMP>"))
    for offset in range(0, len(packet), EXTENDED_CHUNK):
        header = JPEG_EXTENDED_XMP + guid.encode() + struct.pack(">II", len(packet), offset)
        segments += _app1(header + packet[offset:offset + EXTENDED_CHUNK])
    return segments


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@dataclass(frozen=True)
class ImageFormat:
    """How images are encoded: png (lossless, compress_level 1), webp or jpeg at `quality` (1..100; for lossless
    WebP the compression effort), or lossless WebP. Every format carries the A1111 text and the JSON provenance."""

    name: str = "png"
    quality: int = 90
    lossless: bool = False

    def __post_init__(self):
        if self.name not in SUFFIXES:
            raise SdbatchError(f"image_format={self.name} is not a format sdbatch writes: choose one of "
                               f"{', '.join(SUFFIXES)}.")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise SdbatchError(f"image_quality={self.quality} is not a quality: give a whole number from 1 to 100 "
                               "(used by webp and jpeg; 90 is the default).")
        if not isinstance(self.lossless, bool) or (self.lossless and self.name != "webp"):
            raise SdbatchError(f"image_lossless={self.lossless} does not apply to image_format={self.name}: it is "
                               "true or false, and true only with image_format=webp (png is always lossless, jpeg "
                               "never is).")

    @classmethod
    def from_config(cls, cfg) -> "ImageFormat":
        return cls(cfg.image_format, cfg.image_quality, cfg.image_lossless)

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.name]

    def encode(self, pixels: np.ndarray, parameters: str, provenance: dict) -> bytes:
        """The file's bytes: uint8 HxWx3 pixels, the A1111 text and the provenance (read_parameters, read_provenance).

        PNG keeps both as iTXt chunks. WebP and JPEG hold the A1111 text where A1111 writes and reads it, the EXIF
        UserComment, and the provenance as XMP: the one metadata block both formats carry that takes UTF-8 text of
        any length (Extended XMP in JPEG, whose segments hold 64 KiB) and that exiftool shows.
        """
        if self.name == "png":
            return encode_png(pixels, parameters, provenance)
        exif, xmp = exif_user_comment(parameters), provenance_xmp(provenance)
        buffer = io.BytesIO()
        if self.name == "webp":
            Image.fromarray(pixels).save(buffer, format="WEBP", quality=self.quality, lossless=self.lossless,
                                         exif=exif, xmp=xmp)
            return buffer.getvalue()
        if len(exif) > JPEG_SEGMENT:
            raise SdbatchError(f"The A1111 parameters text of this image needs {len(exif)} bytes of EXIF, more than "
                               f"the {JPEG_SEGMENT} one JPEG segment holds (about 32,700 characters of prompt and "
                               "negative prompt). Use image_format=webp or image_format=png, which have no such "
                               "limit, or shorten the prompt.")
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=self.quality, exif=exif,
                                     extra=jpeg_xmp_segments(xmp))
        return buffer.getvalue()


def read_provenance(path: Path) -> dict | None:
    """The JSON provenance of an sdbatch image (PNG, WebP or JPEG), or None when it is missing, partial or not ours."""
    try:
        provenance = json.loads(_read_metadata(path)[1])
    except (TypeError, ValueError):
        return None
    return provenance if isinstance(provenance, dict) else None


def read_parameters(path: Path) -> str | None:
    """The A1111 `parameters` text of a PNG, WebP or JPEG, or None when it has none or is missing or partial."""
    metadata = _read_metadata(path)
    return metadata[0] if metadata else None


def _read_metadata(path: Path) -> tuple[str | None, str | None] | None:
    """(A1111 text, provenance JSON) of a complete PNG, WebP or JPEG file; None if it is not one."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes to the end: a truncated file raises here
            if image.format == "PNG" and _ends_with(path, PNG_END):  # load() lets a PNG cut after its pixels pass
                return image.info.get("parameters"), image.info.get(PROVENANCE_KEY)
            if image.format in ("WEBP", "JPEG"):
                return _exif_comment(image), _xmp_provenance(image)
    except Exception:
        pass
    return None


def _ends_with(path: Path, tail: bytes) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-len(tail), os.SEEK_END)
        return handle.read() == tail


def _exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment as piexif.helper.UserComment.load decodes it for A1111."""
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    encoding = {UNICODE_CODE: "utf-16-be", b"ASCII\x00\x00\x00": "ascii"}.get(bytes(comment or b"")[:8])
    return comment[8:].decode(encoding, errors="replace") if encoding else None


def _xmp_provenance(image: Image.Image) -> str | None:
    try:
        root = ElementTree.fromstring(image.info["xmp"])
        text = _xmp_value(root, f"{{{XMP_NS}}}provenance")
        guid = _xmp_value(root, f"{{{XMP_NOTE_NS}}}HasExtendedXMP")
        if text is None and guid and image.format == "JPEG":
            text = _xmp_value(ElementTree.fromstring(_extended_xmp(image.applist, guid)), f"{{{XMP_NS}}}provenance")
        return text
    except Exception:
        return None  # no XMP, or not XML: the A1111 text may still be there


def _xmp_value(root: ElementTree.Element, name: str) -> str | None:
    """A property as element or attribute (XMP tools may rewrite one as the other)."""
    for element in root.iter():
        if element.tag == name:
            return element.text or ""
        if name in element.attrib:
            return element.attrib[name]
    return None


def _extended_xmp(applist: list[tuple[str, bytes]], guid: str) -> bytes:
    """The Extended XMP packet joined from its JPEG segments; raises unless they make the whole of it."""
    prefix = JPEG_EXTENDED_XMP + guid.encode()
    chunks, length = {}, None
    for marker, data in applist:
        if marker == "APP1" and data.startswith(prefix):
            length, offset = struct.unpack_from(">II", data, len(prefix))
            chunks[offset] = data[len(prefix) + 8:]
    packet = b"".join(chunks[offset] for offset in sorted(chunks))
    if len(packet) != length or hashlib.md5(packet, usedforsecurity=False).hexdigest().upper() != guid:
        raise ValueError(f"Extended XMP {guid} is incomplete")
    return packet


def stage_file(folder: Path, name: str, data: bytes) -> Path:
    """Write data to a fresh temporary file in folder, fsynced, readable by the team (the caller renames it)."""
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}-", dir=folder)  # named: cleanable per file
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = stage_file(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def temp_files(folder: Path, name: str = "") -> list[Path]:
    """Leftovers of writes a crashed run never finished (all of the folder's, or those for one file name)."""
    return list(folder.glob(f"{TEMP_PREFIX}{name}*")) if folder.is_dir() else []


def remove_temp_files(folder: Path, name: str = "") -> int:
    """Delete leftovers of writes a crashed run never finished; returns how many."""
    leftovers = temp_files(folder, name)
    for temp in leftovers:
        temp.unlink(missing_ok=True)
    return len(leftovers)


class ImageWriter:
    """Encodes and writes images on worker threads; each submit returns a future of the seconds it took."""

    def __init__(self, threads: int, image_format: ImageFormat = ImageFormat()):
        self.image_format = image_format
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="sdbatch-write")

    def submit(self, path: Path, pixels, parameters: str, provenance: dict, lease) -> Future:
        """Encode and write one image: staged in the lease's folder, renamed into place only while it holds."""
        return self.pool.submit(self._write, path, pixels, parameters, provenance, lease)

    def _write(self, path: Path, pixels, parameters: str, provenance: dict, lease) -> float:
        start = time.perf_counter()
        data = self.image_format.encode(np.asarray(pixels), parameters, provenance)
        path.parent.mkdir(parents=True, exist_ok=True)
        lease.commit(stage_file(lease.staging, path.name, data), path)
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def describe_os_error(error: BaseException) -> str:
    """Plain words for the usual disk problems: '... is a file, not a folder', 'no space left', ..."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and getattr(error, "filename", None):
        return f"{error.strerror}: {error.filename} (a file is where a folder should be)"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    return str(error) or type(error).__name__
