"""Helpers that write real image files (JPEG, PNG, grayscale, CMYK, broken) for tests."""

import io
import os

import numpy as np
from PIL import Image


def random_rgb(h, w, seed=0):
    """A smooth-ish random RGB uint8 image (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def encode(array, fmt="PNG", mode=None, **kw):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def undecodable_jpeg(seed=9):
    """A JPEG that passes the cheap check (header, end marker) and even PIL's header parse,
    but whose entropy-coded data holds a second SOF marker: TensorFlow cannot decode it."""
    jpeg = encode(random_rgb(90, 120, seed), "JPEG", quality=90)
    mid = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2
    return jpeg[:mid] + b"\xff\xc0\x00\x11\x08" + jpeg[mid + 5 :]


def make_messy_folder(root):
    """A 2-class ImageNet-layout folder: 8 readable files of odd kinds, 6 broken or
    unsupported ones, 1 that is no image.

    Returns:
      dict with the expected 'readable' count and 'skipped' counts per reason.
    """
    jpeg = encode(random_rgb(90, 120, 1), "JPEG", quality=90)
    write(f"{root}/cat/rgb.jpg", jpeg)
    write(f"{root}/cat/gray.JPEG", encode(random_rgb(100, 80, 2), "JPEG", mode="L"))
    write(f"{root}/cat/cmyk.jpeg", encode(random_rgb(80, 80, 3), "JPEG", mode="CMYK"))
    write(f"{root}/cat/png_named.JPEG", encode(random_rgb(70, 90, 4), "PNG"))
    write(f"{root}/dog/tiny.png", encode(random_rgb(20, 30, 5), "PNG"))
    write(f"{root}/dog/rgba.png", encode(random_rgb(64, 64, 6), "PNG", mode="RGBA"))
    write(f"{root}/dog/big.jpg", encode(random_rgb(300, 200, 7), "JPEG"))
    write(f"{root}/dog/photo.webp", encode(random_rgb(60, 80, 10), "WEBP"))
    write(f"{root}/dog/empty.jpg", b"")
    write(f"{root}/dog/corrupt.jpg", b"this is not an image at all" * 10)
    write(f"{root}/cat/truncated.jpg", jpeg[: len(jpeg) // 2])
    write(f"{root}/cat/truncated.png", encode(random_rgb(64, 64, 8), "PNG")[:200])
    write(f"{root}/cat/garbled.jpg", undecodable_jpeg())
    write(f"{root}/dog/scan.tif", encode(random_rgb(40, 40, 11), "TIFF"))
    write(f"{root}/dog/notes.txt", b"ignored: not an image extension")
    return {
        "readable": 8,
        "skipped": {
            "empty": 1,
            "corrupt": 1,
            "truncated": 2,
            "undecodable": 1,
            "unsupported .tif": 1,
        },
    }
