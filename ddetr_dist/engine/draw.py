"""Boxes drawn on images: ground truth and detections with class names and scores, for
TensorBoard, the eval folder and `ddetr predict`."""
from __future__ import annotations

import colorsys
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GROUND_TRUTH_COLOUR = (255, 255, 255)


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(image: Image.Image, detections: Sequence[dict], names: dict[int, str],
               ground_truth: Sequence[dict] = ()) -> Image.Image:
    """A copy of `image` with ground truth (thin white, dashed look by inset) and detections
    ({'bbox': [x0, y0, x1, y1] pixels, 'label': int, 'score': float}) in their class colour,
    labelled 'name 0.87'."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for gt in ground_truth:
        draw.rectangle(gt["bbox"], outline=GROUND_TRUTH_COLOUR, width=1)
    for det in detections:
        colour = class_colour(det["label"])
        x0, y0, x1, y1 = det["bbox"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        text = f"{names.get(det['label'], det['label'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle((x0, ty, x0 + (right - left) + 2, ty + (bottom - top) + 2), fill=colour)
        draw.text((x0 + 1, ty), text, fill=(0, 0, 0), font=font)
    return out


def grid(images: Sequence[Image.Image], columns: int = 2, pad: int = 4) -> Image.Image:
    """Images side by side in rows (each cell the size of the largest image)."""
    width, height = max(i.width for i in images), max(i.height for i in images)
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * width + (columns + 1) * pad, rows * height + (rows + 1) * pad), (32, 32, 32))
    for n, image in enumerate(images):
        r, c = divmod(n, columns)
        canvas.paste(image, (pad + c * (width + pad), pad + r * (height + pad)))
    return canvas
