"""python -m sdbatch.compare: render the same manifest rows two ways and measure how far the images are apart.

    python -m sdbatch.compare prompts=catalog.parquet rows=16 model=sd15 a.dtype=fp16 b.dtype=bf16
    python -m sdbatch.compare a=out-fp16 b=out-bf16          # two folders rendered already

Check a precision, kernel or scheduler change on your own rows before a night. Every `KEY=VALUE` that is not the
tool's own goes to both renders; `a.KEY=VALUE` and `b.KEY=VALUE` to one of them (replacing a shared one). The
first `rows` rows (default 8) of the manifest are rendered by `python -m sdbatch` into `output_dir/a` and
`output_dir/b` (default `output_dir=compare`; a rerun continues them). Then each image the two folders hold for
the same row (id and image index) is compared: PSNR in dB (higher is closer; identical images are counted apart),
SSIM (1 is identical; 7x7 windows, as scikit-image computes it) and the largest difference of one pixel channel
(0..255). The console gets a summary and the rows furthest apart; `output_dir/compare.parquet` gets every image.

Exit codes: 0 compared; 2 a mistake in the command line or the folders (one paragraph); otherwise the exit code
of the render that failed, after its own message.
"""

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from sdbatch import SdbatchError
from sdbatch.manifest import Manifest
from sdbatch.report import read_ledgers

OWN_KEYS = ("prompts", "rows", "output_dir", "a", "b")
WORST_SHOWN = 5


class RenderFailed(Exception):
    def __init__(self, code: int):
        self.code = code


def parse(argv: list[str]) -> tuple[dict, dict[str, dict]]:
    """The tool's own settings, and each side's sdbatch overrides by key (a side's value replaces a shared one)."""
    own, sides = {"rows": "8", "output_dir": "compare"}, {"a": {}, "b": {}}
    shared = {}
    for arg in argv:
        key, equals, value = arg.partition("=")
        if not equals:
            raise SdbatchError(f"sdbatch.compare takes KEY=VALUE arguments, not {arg!r}: for example "
                               "prompts=catalog.parquet a.dtype=fp16 b.dtype=bf16 (see --help).")
        side, dot, rest = key.partition(".")
        if key in OWN_KEYS:
            own[key] = value
        elif dot and side in sides:
            sides[side][rest] = value
        else:
            shared[key] = value
    return own, {side: {**shared, **mine} for side, mine in sides.items()}


def row_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise SdbatchError(f"rows={text} is not a positive whole number: say how many manifest rows to render "
                           "both ways, e.g. rows=16.")
    return int(text)


def write_sample(prompts: str, rows: int, path: Path) -> int:
    """The manifest's first rows, all columns, as one Parquet file; returns how many there were."""
    sample = Manifest(prompts).dataset.head(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sample, path)
    return sample.num_rows


def render(side: str, overrides: dict, sample: Path, folder: Path) -> None:
    command = [sys.executable, "-m", "sdbatch", f"prompts={sample}", f"output_dir={folder}", "overwrite=true",
               *(f"{key}={value}" for key, value in overrides.items())]
    print(f"sdbatch.compare: rendering {side}: {shlex.join(command[1:])}", flush=True)
    code = subprocess.call(command)
    if code:
        print(f"sdbatch.compare: the {side} render exited {code}; nothing was compared", file=sys.stderr)
        raise RenderFailed(code)


def ok_images(folder: Path) -> dict[tuple[str, int], str]:
    table, _, _ = read_ledgers(folder)
    table = table.filter(pc.equal(table["status"], "ok"))
    return {(row["id"], row["image_index"]): row["image_path"]
            for row in table.select(["id", "image_index", "image_path"]).to_pylist()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def window_means(image: np.ndarray, size: int = 7) -> np.ndarray:
    """The mean of every size x size window that fits inside the image (per channel), through summed areas."""
    summed = np.pad(image, ((1, 0), (1, 0), (0, 0))).cumsum(0).cumsum(1)
    return (summed[size:, size:] - summed[:-size, size:] - summed[size:, :-size] + summed[:-size, :-size]) / size ** 2


def ssim(x: np.ndarray, y: np.ndarray, size: int = 7) -> float:
    """Mean structural similarity over the windows inside the image, scikit-image's defaults for 0..255 data
    (uniform 7x7 windows, sample covariances, K1 0.01, K2 0.03), averaged over the colour channels."""
    if min(x.shape[:2]) < size:
        return float("nan")
    c1, c2, unbiased = (0.01 * 255) ** 2, (0.03 * 255) ** 2, size * size / (size * size - 1)
    mx, my = window_means(x, size), window_means(y, size)
    vx = unbiased * (window_means(x * x, size) - mx * mx)
    vy = unbiased * (window_means(y * y, size) - my * my)
    cov = unbiased * (window_means(x * y, size) - mx * my)
    return float(np.mean((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))))


def compare_folders(a: Path, b: Path) -> tuple[pa.Table, int, int]:
    """One row per image both folders rendered for the same row (PSNR, SSIM, the largest difference), and how many
    images only a, and only b, rendered."""
    images_a, images_b = ok_images(a), ok_images(b)
    common = sorted(images_a.keys() & images_b.keys())
    if not common:
        raise SdbatchError(f"{a} and {b} hold no image of the same row (same id and image index) that both rendered "
                           f"(ok: {len(images_a)} in {a}, {len(images_b)} in {b}). Compare two renders of one manifest.")
    records = []
    for row_id, index in common:
        x, y = pixels(a / images_a[row_id, index]), pixels(b / images_b[row_id, index])
        if x.shape != y.shape:
            raise SdbatchError(f"Row {row_id!r} (image {index}) is {x.shape[1]}x{x.shape[0]} in {a} but "
                               f"{y.shape[1]}x{y.shape[0]} in {b}: images of different sizes cannot be compared "
                               "pixel by pixel. Keep width and height the same on both sides.")
        records.append({"id": row_id, "image_index": index, "psnr_db": psnr(x, y), "ssim": ssim(x, y),
                        "max_abs": int(np.abs(x - y).max()), "image_a": str(a / images_a[row_id, index]),
                        "image_b": str(b / images_b[row_id, index])})
    return pa.Table.from_pylist(records), len(images_a) - len(common), len(images_b) - len(common)


def summary(table: pa.Table, a: Path, b: Path, only_a: int, only_b: int) -> str:
    psnrs, ssims = table["psnr_db"].to_numpy(), table["ssim"].to_numpy()
    finite = psnrs[np.isfinite(psnrs)]
    lines = [f"sdbatch.compare: {table.num_rows} image(s) compared, {a} (a) against {b} (b)"]
    if only_a or only_b:
        lines.append(f"  not compared: {only_a} image(s) only a rendered, {only_b} only b rendered (failed or missing)")
    lines.append(f"  identical: {table.num_rows - finite.size}")
    if finite.size:
        lines.append(f"  PSNR of the others: min {finite.min():.1f} dB, median {np.median(finite):.1f} dB, "
                     f"mean {finite.mean():.1f} dB")
    if not np.all(np.isnan(ssims)):
        lines.append(f"  SSIM: min {np.nanmin(ssims):.4f}, mean {np.nanmean(ssims):.4f}")
    lines.append(f"  largest pixel difference: {pc.max(table['max_abs']).as_py()} of 255")
    worst = table.sort_by([("psnr_db", "ascending")]).slice(0, WORST_SHOWN).to_pylist()
    if finite.size:
        lines.append("  furthest apart: " + ", ".join(
            f"{r['id']} #{r['image_index']} ({r['psnr_db']:.1f} dB)" for r in worst if np.isfinite(r["psnr_db"])))
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    own, overrides = parse(argv)
    out = Path(own["output_dir"])
    if "a" in own or "b" in own:
        if not ("a" in own and "b" in own) or "prompts" in own or any(overrides.values()):
            raise SdbatchError("To compare two finished folders give only a=DIR and b=DIR (no prompts= and no "
                               "settings); to render and compare give prompts=FILE with a.KEY=VALUE / b.KEY=VALUE "
                               "settings.")
        a, b = Path(own["a"]), Path(own["b"])
    elif "prompts" not in own:
        raise SdbatchError("Say which manifest to sample: python -m sdbatch.compare prompts=catalog.parquet rows=16 "
                           "a.dtype=fp16 b.dtype=bf16 (or a=DIR b=DIR for two folders rendered already).")
    else:
        sample = out / "sample.parquet"
        count = write_sample(own["prompts"], row_count(own["rows"]), sample)
        print(f"sdbatch.compare: the first {count} row(s) of {own['prompts']} are in {sample}", flush=True)
        a, b = out / "a", out / "b"
        for side, folder in (("a", a), ("b", b)):
            render(side, overrides[side], sample, folder)
    table, only_a, only_b = compare_folders(a, b)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "compare.parquet")
    print(summary(table, a, b, only_a, only_b))
    print(f"  every image: {out / 'compare.parquet'}")
    return 0


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    try:
        sys.exit(run(sys.argv[1:]))
    except RenderFailed as failed:
        sys.exit(failed.code)
    except SdbatchError as error:
        print(f"sdbatch.compare: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # output_dir (or an image in a folder) cannot be written or read
        print(f"sdbatch.compare: error: {error.filename}: {error.strerror}. Choose an output_dir= you can write to, "
              "and folders that sdbatch rendered.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
