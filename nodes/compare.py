"""CompareImages: the original LoRA's image against each resized one (same seed), as numbers and a grid.

PSNR and SSIM come from kornia, which ComfyUI already installs (no model download, unlike LPIPS).
The grid puts the original first, then one captioned tile per target, so the smallest that still
looks the same is visible and measured at once.
"""
from __future__ import annotations

import math

import torch

from ..core.errors import LoraError
from .lora_type import CATEGORY

PSNR_CAP = 100.0  # dB for identical images (kornia gives +inf; JSON and the frontend take no infinity)


def image_scores(original: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of two ComfyUI IMAGEs ([B, H, W, C] in [0, 1]), averaged over the batch."""
    import kornia.metrics

    if original.shape != other.shape:
        raise LoraError(f"an image is {tuple(other.shape)} and the original {tuple(original.shape)}",
                        fix="sample every target at the original's size and batch")
    a = original.float().clamp(0, 1).permute(0, 3, 1, 2)
    b = other.float().clamp(0, 1).permute(0, 3, 1, 2)
    window = min(11, a.shape[-1], a.shape[-2])
    window -= 1 - window % 2  # odd, as kornia needs
    ssim = float(kornia.metrics.ssim(a, b, window_size=max(window, 1)).mean())
    mse = float((a - b).double().pow(2).mean())
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))
    return ssim, psnr


def _tile(image: torch.Tensor, caption: list[str]) -> torch.Tensor:
    """One image (its first in the batch) with its caption drawn below, as [H', W, 3] in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    array = (image[0, :, :, :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    font = ImageFont.load_default()
    line = 12
    height, width = array.shape[:2]
    canvas = Image.new("RGB", (max(width, 160), height + line * len(caption) + 6), (24, 24, 24))
    canvas.paste(Image.fromarray(array), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(caption):
        draw.text((3, height + 3 + i * line), text, fill=(230, 230, 230), font=font)
    import numpy as np

    return torch.from_numpy(np.asarray(canvas).astype("float32") / 255.0)


def grid(tiles: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Tiles in rows of ``columns``, each cell the largest tile's size; [1, H, W, 3]."""
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    out = torch.full((rows * cell_h, columns * cell_w, 3), 24 / 255.0)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        out[r * cell_h:r * cell_h + tile.shape[0], c * cell_w:c * cell_w + tile.shape[1]] = tile
    return out.unsqueeze(0)


class CompareImages:
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("grid", "report", "ssim", "psnr")
    OUTPUT_IS_LIST = (False, False, True, True)
    FUNCTION = "compare"
    DESCRIPTION = ("SSIM and PSNR of each image against the original LoRA's image (sample both with the same "
                   "seed), drawn as a labelled grid: the smallest target that still looks the same.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The image made with the original LoRA."}),
            "images": ("IMAGE", {"tooltip": "The images made with each resized LoRA (a list, e.g. from a sweep)."}),
        }, "optional": {
            "labels": ("STRING", {"forceInput": True, "tooltip": "A label per image (the sweep's labels)."}),
            "columns": ("INT", {"default": 4, "min": 1, "max": 32, "tooltip": "Tiles per row of the grid."}),
        }}

    def compare(self, original, images, labels=None, columns=None):
        reference = original[0]
        labels = list(labels or [])
        columns = int((columns or [4])[0])
        if labels and len(labels) != len(images):
            raise LoraError(f"{len(labels)} labels for {len(images)} images",
                            fix="connect the sweep's labels output beside its images")
        scores = [image_scores(reference, image) for image in images]
        tiles = [_tile(reference, ["original"])]
        lines = []
        for index, (image, (ssim, psnr)) in enumerate(zip(images, scores)):
            label = labels[index] if labels else f"image {index + 1}"
            target, _, rest = label.partition(": ")
            tiles.append(_tile(image, [target, *([rest] if rest else []), f"SSIM {ssim:.4f}  PSNR {psnr:.1f} dB"]))
            lines.append(f"{label}: SSIM {ssim:.4f}, PSNR {psnr:.2f} dB")
        table = [{"label": labels[i] if labels else f"image {i + 1}", "ssim": s, "psnr": p}
                 for i, (s, p) in enumerate(scores)]
        return {"ui": {"lora_resize_compare": table},
                "result": (grid(tiles, columns), "\n".join(lines), [s for s, _ in scores], [p for _, p in scores])}
