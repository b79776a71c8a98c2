"""LLaVA-NeXT's AnyRes geometry on the host: which tiles an image becomes, and where each of
their tokens goes in the language model's sequence.

The model never reshapes by data. The host cuts every image into *slots* of S x S pixels
(S = `tile_size`, the vision tower's resolution) and writes, for each sequence position that
holds an image token, the index of the tower output token that goes there; the model embeds
the slots and gathers.

  slots of one image   base (the whole image resized to S x S), then its rows x cols tiles in
                       row-major order: the order of Hugging Face's LlavaNextImageProcessor
                       (`pixel_values[i]`, base first). `tiles()` makes them, uint8, not
                       normalised (the model normalises).
  tokens of a slot     P = (S // patch_size) ** 2, the CLS token dropped (HF's
                       vision_feature_select_strategy="default"). In one sample the slots of
                       all its images are numbered 0, 1, ...; token k of slot s is `s * P + k`.
  feature_index        int32, one entry per image token of the sequence: a flattened token,
                       or NEWLINE (-2) for the learned `image_newline` vector. Text positions
                       hold -1; that is the sample builder's business, not this module's.

For one LLaVA-NeXT image the index lists the base slot's P tokens, then the tile grid seen
as one (rows * p) x (cols * p) token grid (p = S // patch_size), cropped to the part that
is not padding, row by row, each row followed by NEWLINE. This is the order in which HF's
`LlavaNextModel.pack_image_features` (with `unpad_image`) lays the features out, and its
length is the number of `<image>` tokens `LlavaNextProcessor` writes for the image
(`num_image_tokens`).

Sizes are (height, width) everywhere, images' and pinpoints' alike: HF's
`image_grid_pinpoints` are [height, width] pairs (`select_best_resolution` reads
`for height, width in possible_resolutions`, and `get_anyres_image_grid_shape` returns
(best_height // S, best_width // S) = (rows, cols), although its docstring says
(width, height)). The original LLaVA code reads the same lists as (width, height); the
published lists contain each pair in both orders, so the two readings agree on them.

Three roundings are HF's and are kept exactly:
  * the resize before tiling rounds the fitted side up with `math.ceil` of a float product,
    so an exact 504.0 computed as 504.00000000000006 becomes 505 (`fitted_size`);
  * the pixel padding is split floor / rest (top-left gets the smaller half), but the
    token grid is cropped symmetrically: `padding = (current - content) // 2` from both
    ends, so an odd difference keeps one padding row (or column) of tokens;
  * the token content size is floor(original * current / original_other) (HF writes
    `int(round(x, 7))` of the float product, which is that floor for any image side
    under 10**7 pixels; here it is integer arithmetic).
The pixels and the tokens are cropped by separate rules, from the original size each, so
the kept tokens only approximate where the image lies on the canvas; HF's model was trained
so, and this module follows it.

An image small enough to fit every pinpoint whole keeps all its pixels in each, and the
least padding decides: it gets the first listed pinpoint whatever its shape (a 27x1 image
gets LLaVA-v1.6's wide 336x672). An image so long and thin that its cropped token grid
keeps no row or no column (with LLaVA-v1.6: beyond 1:72 or 72:1, or 1:48 or 24:1 for a small
image on the 336x672 grid) is refused with a ValueError; HF would give it only its base and
newlines.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np
from PIL import Image

# feature_index's value for the learned image_newline vector.
NEWLINE = -2

# LLaVA-v1.6's grid resolutions, (height, width), for a 336-pixel tower.
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _check_size(image_hw: Sequence[int]) -> tuple[int, int]:
  if len(image_hw) != 2:
    raise ValueError(f"image size {tuple(image_hw)} should be (height, width)")
  height, width = (int(side) for side in image_hw)
  if height <= 0 or width <= 0:
    raise ValueError(f"image size {height}x{width} (height x width) should be positive")
  return height, width


def _check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> list[tuple[int, int]]:
  if tile_size <= 0:
    raise ValueError(f"tile_size={tile_size} should be positive")
  if len(pinpoints) == 0:
    raise ValueError("pinpoints is empty: expected at least one (height, width) resolution")
  checked = []
  for pinpoint in pinpoints:
    if len(pinpoint) != 2:
      raise ValueError(f"pinpoint {tuple(pinpoint)} should be a (height, width) pair")
    height, width = (int(side) for side in pinpoint)
    if height <= 0 or width <= 0 or height % tile_size or width % tile_size:
      raise ValueError(f"pinpoint {height}x{width} (height x width) should be positive multiples of "
                       f"tile_size={tile_size}")
    checked.append((height, width))
  return checked


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The (height, width) of `pinpoints` that LLaVA-NeXT resizes an image of `image_hw` to.

  The one that keeps most of the image's pixels once it is scaled to fit (never counting
  more than the image has), then, among equals, the one with the least padding; the first
  listed wins a full tie. Same result as HF's `select_best_resolution`, float arithmetic
  included.
  """
  height, width = _check_size(image_hw)
  best, best_kept, best_wasted = None, 0, math.inf
  for pin_height, pin_width in pinpoints:
    scale = min(pin_width / width, pin_height / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    wasted = pin_height * pin_width - kept
    if kept > best_kept or (kept == best_kept and wasted < best_wasted):
      best, best_kept, best_wasted = (int(pin_height), int(pin_width)), kept, wasted
  if best is None:
    raise ValueError(f"pinpoints {list(pinpoints)} is empty: expected (height, width) resolutions")
  return best


def grid_shape(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[int, int]:
  """(rows, cols) of S x S tiles that an image of `image_hw` is cut into."""
  best_height, best_width = select_best_resolution(image_hw, _check_pinpoints(pinpoints, tile_size))
  return best_height // tile_size, best_width // tile_size


def num_slots(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
  """How many S x S slots one image takes: the base plus its rows * cols tiles."""
  rows, cols = grid_shape(image_hw, pinpoints, tile_size)
  return 1 + rows * cols


def tokens_per_slot(tile_size: int, patch_size: int) -> int:
  """P, the tower's output tokens for one S x S slot, CLS dropped."""
  if patch_size <= 0 or tile_size < patch_size:
    raise ValueError(f"patch_size={patch_size} should be positive and at most tile_size={tile_size}")
  return (tile_size // patch_size) ** 2


def fitted_size(image_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
  """(height, width) of the image resized to fit in `target_hw` keeping its aspect ratio.

  The side that limits the scale is the target's; the other is rounded up (and capped) from
  a float product, as HF's `get_patch_output_size` does, on purpose: it decides the pixels.
  """
  height, width = _check_size(image_hw)
  target_height, target_width = target_hw
  scale_height, scale_width = target_height / height, target_width / width
  if scale_width < scale_height:
    return min(math.ceil(height * scale_width), target_height), target_width
  return target_height, min(math.ceil(width * scale_height), target_width)


def _kept_token_window(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int,
                       patch_size: int) -> tuple[int, int, int, int]:
  """(first_row, rows, first_col, cols) of the tile grid's tokens that are not padding.

  Rows and columns count tokens of the whole grid, (rows * p) x (cols * p) with
  p = tile_size // patch_size.
  """
  height, width = _check_size(image_hw)
  grid_rows, grid_cols = grid_shape((height, width), pinpoints, tile_size)
  side = math.isqrt(tokens_per_slot(tile_size, patch_size))
  token_rows, token_cols = grid_rows * side, grid_cols * side
  first_row, first_col, kept_rows, kept_cols = 0, 0, token_rows, token_cols
  # Exact form of HF's float test width / height > token_cols / token_rows.
  if width * token_rows > token_cols * height:  # wider than the grid: padding above and below
    content_rows = height * token_cols // width
    first_row = (token_rows - content_rows) // 2
    kept_rows = token_rows - 2 * first_row
  else:  # as tall or taller: padding left and right
    content_cols = width * token_rows // height
    first_col = (token_cols - content_cols) // 2
    kept_cols = token_cols - 2 * first_col
  if kept_rows == 0 or kept_cols == 0:
    raise ValueError(
        f"image {height}x{width} (height x width) is too small for its {grid_rows}x{grid_cols} tile grid of "
        f"{token_rows}x{token_cols} tokens: it would keep {kept_rows}x{kept_cols} of them once the padding is "
        "cropped; expected at least one row and one column (give it a less extreme aspect ratio)")
  return first_row, kept_rows, first_col, kept_cols


def num_image_tokens(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int,
                     patch_size: int) -> int:
  """How many sequence positions one LLaVA-NeXT image takes: `len(feature_index(...))`.

  P base tokens, then the unpadded token grid with one NEWLINE per row; equal to the number
  of `<image>` tokens HF's LlavaNextProcessor expands one `<image>` to.
  """
  _, kept_rows, _, kept_cols = _kept_token_window(image_hw, pinpoints, tile_size, patch_size)
  return tokens_per_slot(tile_size, patch_size) + kept_rows * (kept_cols + 1)


def feature_index(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int, patch_size: int,
                  first_slot: int = 0) -> np.ndarray:
  """int32 [num_image_tokens]: the flattened tower token (or NEWLINE) for each position of one image.

  The image's slots are `first_slot` (its base) to `first_slot + rows * cols` (its last
  tile). Order: the base's P tokens, then each kept row of the unpadded token grid, left to
  right, followed by NEWLINE.
  """
  if first_slot < 0:
    raise ValueError(f"first_slot={first_slot} should be >= 0")
  first_row, kept_rows, first_col, kept_cols = _kept_token_window(image_hw, pinpoints, tile_size, patch_size)
  _, grid_cols = grid_shape(image_hw, pinpoints, tile_size)
  per_slot = tokens_per_slot(tile_size, patch_size)
  side = math.isqrt(per_slot)
  rows = np.arange(first_row, first_row + kept_rows)[:, None]
  cols = np.arange(first_col, first_col + kept_cols)[None, :]
  # Token (row, col) of the grid is token (row % side, col % side) of the tile at
  # (row // side, col // side), whose slot follows the base in row-major order.
  slot = first_slot + 1 + (rows // side) * grid_cols + cols // side
  grid = slot * per_slot + (rows % side) * side + cols % side
  grid = np.concatenate([grid, np.full((kept_rows, 1), NEWLINE)], axis=1)
  base = plain_feature_index(first_slot, per_slot)
  return np.concatenate([base, grid.reshape(-1)]).astype(np.int32)


def plain_feature_index(first_slot: int, tokens_per_slot: int) -> np.ndarray:
  """int32 [tokens_per_slot]: one slot's tokens in order (a LLaVA-1.5 image, no newline)."""
  if first_slot < 0 or tokens_per_slot <= 0:
    raise ValueError(f"first_slot={first_slot} should be >= 0 and tokens_per_slot={tokens_per_slot} > 0")
  start = first_slot * tokens_per_slot
  return np.arange(start, start + tokens_per_slot, dtype=np.int32)


def tiles(image: np.ndarray, pinpoints: Sequence[Sequence[int]], tile_size: int) -> np.ndarray:
  """uint8 [1 + rows * cols, S, S, 3]: the slots of one image, base first, from uint8 [H, W, 3].

  As HF's LlavaNextImageProcessor before rescaling: the base is the image resized to S x S;
  the tiles cut, row-major, the image resized to `fitted_size` of its best resolution and
  pasted in the middle of a black canvas of that resolution (the odd pixel of padding goes
  bottom / right). Both resizes are PIL's bicubic.
  """
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"image is {described}: expected a uint8 [H, W, 3] array")
  height, width = _check_size(image.shape[:2])
  pinpoints = _check_pinpoints(pinpoints, tile_size)
  best_height, best_width = select_best_resolution((height, width), pinpoints)
  fit_height, fit_width = fitted_size((height, width), (best_height, best_width))
  picture = Image.fromarray(image)
  canvas = np.zeros((best_height, best_width, 3), np.uint8)
  top, left = (best_height - fit_height) // 2, (best_width - fit_width) // 2
  fitted = picture.resize((fit_width, fit_height), Image.Resampling.BICUBIC)
  canvas[top:top + fit_height, left:left + fit_width] = np.asarray(fitted)
  rows, cols = best_height // tile_size, best_width // tile_size
  grid = canvas.reshape(rows, tile_size, cols, tile_size, 3).swapaxes(1, 2).reshape(-1, tile_size, tile_size, 3)
  base = np.asarray(picture.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
  return np.concatenate([base[None], grid])
