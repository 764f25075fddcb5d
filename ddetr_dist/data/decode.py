"""One raw sample (image bytes + its JSON record) -> a transformed (image, target), or a
`SampleError` saying why it cannot be used. Shared by the shard stream and the loose-file
path of the benchmark, so both measure and train on the same code."""
from __future__ import annotations

import io
import json
import random
from typing import Callable

from PIL import Image

from ddetr_dist.data.coco import SampleError, record_to_target
from ddetr_dist.data.skips import SkipCounter

IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}  # PIL format -> the extension in a shard

Transform = Callable[[Image.Image, dict, random.Random], tuple]


def open_image(data: bytes) -> Image.Image:
    """Decode fully (a truncated JPEG fails here, not later). Raises SampleError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError("corrupt_image", f"image does not decode: {e}") from e
    if image.format not in IMAGE_EXTENSIONS:
        raise SampleError("corrupt_image", f"unsupported image format {image.format}")
    return image


class SampleDecoder:
    """Decode, build the target, transform; count what cannot be used in `skips`."""

    def __init__(self, transform: Transform, category_ids: frozenset[int], keep_crowd: bool,
                 skips: SkipCounter):
        self.transform = transform
        self.category_ids = category_ids
        self.keep_crowd = keep_crowd
        self.skips = skips

    def __call__(self, sample: dict, rng: random.Random):
        """A sample as read from a shard ({'__key__', 'jpg' or 'png', 'json', ...}) -> the
        transformed (image, target), or None after counting the skip."""
        where = f"{sample.get('__key__')} in {sample.get('__url__')}"
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS.values() if ext in sample), None)
        if image_bytes is None or "json" not in sample:
            missing = "image" if image_bytes is None else "json"
            self.skips.record("missing_part", f"{where}: no {missing} (has {sorted(k for k in sample if k[0] != '_')})")
            return None
        try:
            record = json.loads(sample["json"])
        except ValueError as e:
            self.skips.record("bad_json", f"{where}: {e}")
            return None
        return self.decode(image_bytes, record, rng, where)

    def decode(self, image_bytes: bytes, record: dict, rng: random.Random, where: str):
        try:
            target, dropped = record_to_target(record, self.category_ids, self.keep_crowd)
            image = open_image(image_bytes)
            if image.mode != "RGB":  # grayscale or CMYK JPEGs exist in COCO
                image = image.convert("RGB")
            expected = (record["width"], record["height"])
            if image.size != expected:
                raise SampleError("corrupt_image", f"decodes to {image.size}, the JSON says {expected}")
        except SampleError as e:
            self.skips.record(e.reason, f"{where}: {e}")
            return None
        if dropped:
            self.skips.record("dropped_box", f"{where}: {dropped} box(es) of zero size once clamped", dropped)
        return self.transform(image, target, rng)
