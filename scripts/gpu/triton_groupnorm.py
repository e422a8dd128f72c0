"""An experiment, not used by sdbatch: GroupNorm, and the SiLU after it, in two Triton passes over channels-last
activations. bench_groupnorm.py and profile_attention.py --triton-norms measure it against Inductor's kernels.

The premise: SDXL's GroupNorm kernels took 13.2 ms of a 242 ms compiled UNet step channels-last against 6.6 ms
in NCHW (H100), as if Inductor read channels-last activations badly. These passes read whole pixels: one finds each
channel's sums, one normalises, applies the affine and the SiLU and writes the result in the same layout. Measured
(H100, docs/benchmarks/notes.md): between two convolutions Inductor's own kernels are 1.3× faster than these, and
the whole SD1.5 step is even; the slow kernels in the full UNet are those Inductor fuses with other work.

Each image's statistics come from its own pixels only, summed in a fixed order, so a row's pixels never depend on
its batch. Inputs that are not channels-last CUDA tensors take torch's group_norm."""

import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every call takes torch's group_norm
    triton = None

BLOCK_P, BLOCK_C = 64, 64  # pixels × channels per program: 128-byte rows of fp16 channels
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs the kernels on CPU tensors


def uses_triton(x: torch.Tensor) -> bool:
    return (triton is not None and x.dim() == 4 and (x.device.type == "cuda" or INTERPRETED)
            and x.is_contiguous(memory_format=torch.channels_last))


if triton is not None:
    @triton.jit
    def _channel_sums(x_ptr, sums_ptr, pixels, channels, blocks, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """For one image and one block of pixels: each channel's sum and sum of squares, shifted by the image's
        first pixel so that the variance keeps its precision when the mean is large."""
        n, p, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = p * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < pixels) & (cols[None, :] < channels)
        image = x_ptr + n.to(tl.int64) * pixels * channels
        x = tl.load(image + rows[:, None] * channels + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        first = tl.load(image + cols, mask=cols < channels, other=0.0).to(tl.float32)
        d = tl.where(inside, x - first[None, :], 0.0)
        out = sums_ptr + ((n * blocks + p) * 2) * channels + cols
        tl.store(out, tl.sum(d, axis=0), mask=cols < channels)
        tl.store(out + channels, tl.sum(d * d, axis=0), mask=cols < channels)

    @triton.jit
    def _normalise(x_ptr, scale_ptr, shift_ptr, y_ptr, pixels, channels, SILU: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        n, p, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = p * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < pixels) & (cols[None, :] < channels)
        offsets = n.to(tl.int64) * pixels * channels + rows[:, None] * channels + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + n * channels + cols, mask=cols < channels, other=0.0)
        shift = tl.load(shift_ptr + n * channels + cols, mask=cols < channels, other=0.0)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


@torch.library.triton_op("sdbatch::group_norm", mutates_args=())
def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
               silu: bool) -> torch.Tensor:
    """silu(group_norm(x)) if silu else group_norm(x), for an affine GroupNorm."""
    if not uses_triton(x):
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    from torch.library import wrap_triton

    n, channels, height, width = x.shape
    pixels = height * width
    grid = (n, triton.cdiv(pixels, BLOCK_P), triton.cdiv(channels, BLOCK_C))
    sums = x.new_empty((n, grid[1], 2, channels), dtype=torch.float32)
    wrap_triton(_channel_sums)[grid](x, sums, pixels, channels, grid[1], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    scale, shift = affine(x, sums.sum(1), weight, bias, groups, eps)
    y = torch.empty_like(x)
    wrap_triton(_normalise)[grid](x, scale, shift, y, pixels, channels, SILU=silu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


def affine(x, sums, weight, bias, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the scale and shift that normalise by the channel's group and apply the affine.
    sums: (n, 2, channels), each channel's sum and sum of squares of x less the image's first pixel."""
    n, channels, height, width = x.shape
    pixels = height * width
    first = x[:, :, 0, 0].float()
    mean = first + sums[:, 0] / pixels  # per channel
    spread = sums[:, 1] - sums[:, 0] ** 2 / pixels  # per channel: the sum of squared deviations from its mean
    mean, spread = mean.view(n, groups, -1), spread.view(n, groups, -1)
    group_mean = mean.mean(-1, keepdim=True)  # Chan et al.'s pairwise combination of the channels' moments
    group_spread = spread.sum(-1, keepdim=True) + pixels * ((mean - group_mean) ** 2).sum(-1, keepdim=True)
    rstd = torch.rsqrt(group_spread / (pixels * mean.shape[-1]) + eps)
    scale = rstd * weight.float().view(groups, -1)
    shift = bias.float().view(groups, -1) - group_mean * scale
    return scale.reshape(n, channels).contiguous(), shift.reshape(n, channels).contiguous()


class GroupNorm(nn.Module):
    """An affine nn.GroupNorm computed by sdbatch::group_norm, with the SiLU that follows it when silu."""

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        self.groups, self.eps, self.silu = norm.num_groups, norm.eps, silu
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.weight, self.bias, self.groups, self.eps, self.silu)


class TimeEmbeddingSiLU(nn.Module):
    """A ResnetBlock2D's nonlinearity once its GroupNorms carry their SiLU: it still activates the time embedding
    (2-D), and passes the block's 4-D activations through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if x.dim() == 2 else x


def convert(model) -> int:
    """Swap the UNet's and the VAE decoder's affine GroupNorms for GroupNorm, each with the SiLU after it where
    there is one; returns how many. Blocks whose GroupNorm is followed by something else keep torch's."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    converted = 0
    for owner in (model.unet, model.vae.decoder):
        for block in owner.modules():
            if (isinstance(block, ResnetBlock2D) and isinstance(block.nonlinearity, nn.SiLU)
                    and block.time_embedding_norm == "default"):
                block.norm1, block.norm2 = GroupNorm(block.norm1, silu=True), GroupNorm(block.norm2, silu=True)
                block.nonlinearity = TimeEmbeddingSiLU()
                converted += 2
            elif isinstance(block, Transformer2DModel) and isinstance(getattr(block, "norm", None), nn.GroupNorm):
                block.norm = GroupNorm(block.norm, silu=False)
                converted += 1
        if isinstance(getattr(owner, "conv_norm_out", None), nn.GroupNorm) and isinstance(owner.conv_act, nn.SiLU):
            owner.conv_norm_out, owner.conv_act = GroupNorm(owner.conv_norm_out, silu=True), nn.Identity()
            converted += 1
    return converted
