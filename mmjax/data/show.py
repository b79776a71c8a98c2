"""A grid of records with their text: what the model will see, for a person to check."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmjax.data import builders
from mmjax.data.preprocess import decode_image

CELL = 128  # pixels per image in the grid (images are scaled up, nearest neighbour)
TEXT_WIDTH = 360
ROW_GAP = 6


def render_grid(data_dir: str | None, split: str, out: str, rows: int = 8,
                names: tuple[str, ...] | None = None) -> tuple[int, int]:
  """Writes a PNG of `rows` records (cycling through the datasets); returns (width, height).

  Each row: the record's images, left to right, then its id and text.
  """
  names = names or tuple(builders.dataset_names(data_dir))
  sources = [builders.open_split(data_dir, n, split) for n in names]
  records = [sources[r % len(sources)][r // len(sources)] for r in range(rows)]
  max_images = max(1, max(len(r["images"]) for r in records))
  width = max_images * CELL + TEXT_WIDTH
  canvas = Image.new("RGB", (width, rows * (CELL + ROW_GAP)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for row, record in enumerate(records):
    top = row * (CELL + ROW_GAP)
    for k, data in enumerate(record["images"]):
      try:
        pixels = decode_image(bytes(data), None)
      except Exception:  # pylint: disable=broad-except
        pixels = np.zeros((8, 8, 3), np.uint8)  # a bad image shows as black
      canvas.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.Resampling.NEAREST),
                   (k * CELL, top))
    text = f"[{record['id'].decode()}] {record['text'].decode()}"
    lines = textwrap.wrap(text, width=TEXT_WIDTH // 6)[:CELL // 12]
    draw.multiline_text((max_images * CELL + 6, top + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
  canvas.save(out)
  return canvas.size
