"""A histogram as a PNG file, written with zlib alone (no plotting library is a dependency of the trainer).

`histogram_png(path, values, marks, highlight)`: 640 x 320 pixels, 48 bins from 0 to the largest value (or mark in
range), bars blue, each of `marks` a grey vertical line when it falls inside the range, `highlight` a red one.
No axis text: the numbers are in the Markdown/JSON report beside it (length_report.py).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

W, H, BINS, MARGIN = 640, 320, 48, 10
WHITE, BLUE, GREY, RED, BLACK = (255, 255, 255), (70, 110, 200), (150, 150, 150), (220, 40, 40), (0, 0, 0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """Rows of RGB tuples -> PNG bytes (8-bit RGB, no filtering)."""
    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def histogram_png(path: str | Path, values: list[int], marks: tuple[int, ...] = (), highlight: int | None = None) -> Path:
    top = max([*values, highlight or 0, 1])
    shown = [m for m in marks if m <= top * 1.25]
    span = max([top, *shown]) * 1.02
    counts = [0] * BINS
    for v in values:
        counts[min(BINS - 1, int(v / span * BINS))] += 1
    img = [[WHITE] * W for _ in range(H)]
    plot_w, plot_h, most = W - 2 * MARGIN, H - 2 * MARGIN, max(counts) or 1
    x_of = lambda v: MARGIN + min(plot_w - 1, int(v / span * plot_w))
    for b, n in enumerate(counts):
        x0, x1 = MARGIN + b * plot_w // BINS, MARGIN + (b + 1) * plot_w // BINS - 1
        for y in range(H - MARGIN - round(n / most * plot_h), H - MARGIN):
            for x in range(x0, max(x0 + 1, x1)):
                img[y][x] = BLUE
    for mark, colour in [*((m, GREY) for m in shown), *(((highlight, RED),) if highlight else ())]:
        for y in range(MARGIN, H - MARGIN):
            img[y][x_of(mark)] = colour
    for x in range(MARGIN, W - MARGIN):
        img[H - MARGIN][x] = BLACK
    path = Path(path)
    path.write_bytes(encode_png(img))
    return path
