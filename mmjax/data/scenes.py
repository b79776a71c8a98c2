"""Procedural scenes of coloured shapes, and the text that describes them.

The embedded dataset is made of these scenes: 1 to 4 shapes (circle, square, triangle) in
5 distinct colours, one per column of a 4-column layout so that "left of" is never
ambiguous, on a plain background with a soft gradient. Everything the text says
(how many, which colour, which shape, what is left of what) is decided by the scene and
cannot be guessed from the words around it: a model has to look.

A `Scene` holds integer parameters only, so it renders to the same pixels everywhere and
its `key` identifies it exactly (used to keep the splits disjoint).

Text conventions: lower case; numbers as digits (answers are single words or digits, so
exact match is meaningful); `<image>` marks where an image stands and `<|endofchunk|>`
ends the text that speaks of it.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 210, 30),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
NUM_COLUMNS = 4
MAX_OBJECTS = 4
_SUPERSAMPLE = 2  # draw larger, then downsample: anti-aliased edges at 32-64 px


@dataclasses.dataclass(frozen=True)
class Shape:
  """One object: its kind, colour, centre and diameter in pixels of the scene."""
  shape: str
  colour: str
  column: int
  x: int
  y: int
  size: int

  @property
  def name(self) -> str:
    return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """Shapes sorted left to right on a vertical gradient from `top` to `bottom`."""
  image_size: int
  top: tuple[int, int, int]
  bottom: tuple[int, int, int]
  shapes: tuple[Shape, ...]

  @property
  def key(self) -> str:
    """Identifies the rendered pixels exactly (all parameters are integers)."""
    parts = [f"{self.image_size}", "%d,%d,%d" % self.top, "%d,%d,%d" % self.bottom]
    parts += [f"{s.shape[0]}{s.colour}{s.x},{s.y},{s.size}" for s in self.shapes]
    return "|".join(parts)

  @classmethod
  def from_key(cls, key: str) -> Scene:
    """The scene whose `key` is `key` (the records of the embedded dataset store them)."""
    try:
      size, top, bottom, *shapes = key.split("|")
      image_size = int(size)
      parsed = []
      for part in shapes:
        kind = next(k for k in SHAPES if k[0] == part[0])
        colour = next(c for c in COLOURS if part[1:].startswith(c))
        x, y, diameter = (int(v) for v in part[1 + len(colour):].split(","))
        column = min(NUM_COLUMNS - 1, int(x * NUM_COLUMNS // image_size))
        parsed.append(Shape(shape=kind, colour=colour, column=column, x=x, y=y, size=diameter))
      scene = cls(image_size=image_size, top=tuple(int(v) for v in top.split(",")),
                  bottom=tuple(int(v) for v in bottom.split(",")), shapes=tuple(parsed))
    except (ValueError, StopIteration) as e:
      raise ValueError(f"scene key {key!r}; expected 'size|r,g,b|r,g,b|' and shapes like "
                       "'cred12,30,9' (Scene.key's form)") from e
    if not parsed or scene.key != key:
      raise ValueError(f"scene key {key!r}; expected Scene.key's form with at least one shape")
    return scene


def sample_scene(rng: np.random.Generator, image_size: int) -> Scene:
  """A random scene: 1-4 shapes, each colour and kind drawn independently."""
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  columns = np.sort(rng.choice(NUM_COLUMNS, size=count, replace=False))
  column_width = image_size / NUM_COLUMNS
  # Sizes and jitter keep neighbours from touching: size <= 0.8 column, jitter small.
  lo, hi = max(3, round(0.55 * column_width)), max(4, round(0.8 * column_width))
  jitter = max(0, round(0.08 * column_width))
  shapes = []
  for column in columns:
    size = int(rng.integers(lo, hi + 1))
    x = int(round((column + 0.5) * column_width)) + int(rng.integers(-jitter, jitter + 1))
    margin = size // 2 + 1
    y = int(rng.integers(margin, image_size - margin))
    shapes.append(Shape(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        column=int(column), x=x, y=y, size=size))
  # Muted, low-saturation backgrounds so that every colour above stands out.
  grey = int(rng.integers(70, 200))
  top = tuple(int(np.clip(grey + rng.integers(-18, 19), 0, 255)) for _ in range(3))
  bottom = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in top)
  return Scene(image_size=image_size, top=top, bottom=bottom, shapes=tuple(shapes))


def render(scene: Scene) -> np.ndarray:
  """The scene as uint8 [H, W, 3]."""
  s = scene.image_size
  big = s * _SUPERSAMPLE
  ramp = ((np.arange(s, dtype=np.float64) + 0.5) / s)[:, None, None]
  top = np.asarray(scene.top, np.float64)[None, None, :]
  bottom = np.asarray(scene.bottom, np.float64)[None, None, :]
  background = np.broadcast_to(top + (bottom - top) * ramp, (s, s, 3))
  image = Image.fromarray(np.round(background).astype(np.uint8))
  # Drawn at `_SUPERSAMPLE` times the size, then box-filtered down: anti-aliased edges.
  layer = image.resize((big, big), Image.Resampling.NEAREST)
  draw = ImageDraw.Draw(layer)
  for shape in scene.shapes:
    cx, cy, r = shape.x * _SUPERSAMPLE, shape.y * _SUPERSAMPLE, shape.size * _SUPERSAMPLE / 2
    fill = COLOURS[shape.colour]
    if shape.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.shape == "square":
      side = r * 0.85  # same visual area as the circle, roughly
      draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
  return np.asarray(layer.resize((s, s), Image.Resampling.BOX), dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (fast compression: the build is time-bound)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


# ---------------------------------------------------------------- text about a scene

def _plural(shape: str, n: int) -> str:
  return shape if n == 1 else shape + "s"


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def left_to_right(scene: Scene) -> str:
  """The caption that names every shape in order: "from left to right: a red circle and a
  blue square." (the first of `caption`'s templates, which every scene has)."""
  return f"from left to right: {_join([f'a {s.name}' for s in scene.shapes])}."


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """One sentence naming every shape, left to right."""
  names = [f"a {s.name}" for s in scene.shapes]
  n = len(names)
  templates = [left_to_right(scene)]
  templates.append(f"there {'is' if n == 1 else 'are'} {n} {_plural('shape', n)}: {_join(names)}.")
  if n == 1:
    templates.append(f"a picture of {names[0]}.")
  if n == 2:
    templates.append(f"{names[0]} on the left and {names[1]} on the right.")
  return templates[int(rng.integers(len(templates)))]


def questions(scene: Scene) -> list[tuple[str, str, str]]:
  """All (kind, question, answer) pairs that the scene answers unambiguously."""
  shapes = scene.shapes
  n = len(shapes)
  out = [("count", "how many shapes are there?", str(n))]
  kinds = sorted({s.shape for s in shapes})
  for kind in kinds:
    k = sum(s.shape == kind for s in shapes)
    out.append(("count_shape", f"how many {kind}s are there?", str(k)))
    if k == 1:
      colour = next(s.colour for s in shapes if s.shape == kind)
      out.append(("colour", f"what colour is the {kind}?", colour))
  for colour in sorted({s.colour for s in shapes}):
    same = [s for s in shapes if s.colour == colour]
    if len(same) == 1:
      out.append(("shape", f"what shape is the {colour} one?", same[0].shape))
  if n >= 2:
    out.append(("leftmost", "what colour is the leftmost shape?", shapes[0].colour))
    out.append(("rightmost", "what colour is the rightmost shape?", shapes[-1].colour))
    unique = [s for s in shapes if sum(t.name == s.name for t in shapes) == 1]
    for a in unique:
      for b in unique:
        if a is not b:
          side = "left" if a.x < b.x else "right"
          out.append(("position", f"is the {a.name} left or right of the {b.name}?", side))
  return out


# Question kinds are drawn uniformly first, so frequent kinds (position pairs) do not crowd
# out the rest; within a kind the question is drawn uniformly. The answers then follow the
# scenes' statistics (most "how many circles?" have the answer 1): fine for the facts that
# documents state, not for the question-answer split (see `sample_balanced_question`).
def sample_question(scene: Scene, rng: np.random.Generator,
                    exclude: frozenset[str] | set[str] = frozenset()) -> tuple[str, str, str] | None:
  """One (kind, question, answer) for the scene, not one of the questions in `exclude`;
  None when every question of the scene is excluded."""
  pairs = [p for p in questions(scene) if p[1] not in exclude]
  if not pairs:
    return None
  kinds = sorted({k for k, _, _ in pairs})
  kind = kinds[int(rng.integers(len(kinds)))]
  of_kind = [p for p in pairs if p[0] == kind]
  return of_kind[int(rng.integers(len(of_kind)))]


def question_kind(question: str) -> str | None:
  """The kind (a key of `ANSWERS`) of a question worded as `questions` words it, else None."""
  if question == "how many shapes are there?":
    return "count"
  if question in ("what colour is the leftmost shape?", "what colour is the rightmost shape?"):
    return question.split()[4]
  for shape in SHAPES:
    if question == f"how many {shape}s are there?":
      return "count_shape"
    if question == f"what colour is the {shape}?":
      return "colour"
  if any(question == f"what shape is the {colour} one?" for colour in COLOURS):
    return "shape"
  if question.startswith("is the ") and " left or right of the " in question and question.endswith("?"):
    return "position"
  return None


# Every answer each kind of question can have.
ANSWERS = {
    "count": tuple(str(n) for n in range(1, MAX_OBJECTS + 1)),
    "count_shape": tuple(str(n) for n in range(1, MAX_OBJECTS + 1)),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "leftmost": tuple(COLOURS),
    "rightmost": tuple(COLOURS),
    "position": ("left", "right"),
}
QUESTION_KINDS = tuple(ANSWERS)


def sample_balanced_question(
    rng: np.random.Generator, image_size: int, accept=None, max_scenes: int = 100_000,
) -> tuple[Scene, tuple[str, str, str]]:
  """A scene and a question about it whose answer the question's words do not predict.

  The kind of question is drawn uniformly, then its answer uniformly among `ANSWERS[kind]`,
  and then scenes until one answers a question of that kind that way: every answer of a
  question is about equally likely (what VQA v2, Goyal et al. 2017, aimed at by pairing
  each question with a similar image of another answer), so a model that reads only the
  text does no better than chance, and the accuracy above chance measures what it saw.
  `accept(scene)` may refuse scenes (those of other splits).
  """
  kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
  answer = ANSWERS[kind][int(rng.integers(len(ANSWERS[kind])))]
  for _ in range(max_scenes):
    scene = sample_scene(rng, image_size)
    matches = [p for p in questions(scene) if p[0] == kind and p[2] == answer]
    if matches and (accept is None or accept(scene)):
      return scene, matches[int(rng.integers(len(matches)))]
  raise RuntimeError(f"no scene out of {max_scenes} answers a {kind!r} question with {answer!r}")


def qa_text(question: str, answer: str | None = None) -> str:
  """The prompt format of a question about the image before it.

  With an answer (training text, few-shot examples):
  `"<image>Question: how many shapes are there? Answer: 3<|endofchunk|>"`;
  without one (the query a model completes): `"<image>Question: ... Answer:"`.
  """
  prompt = f"{IMAGE_TOKEN}Question: {question} Answer:"
  return prompt if answer is None else f"{prompt} {answer}{END_OF_CHUNK_TOKEN}"


_INTROS = ("", "", "some pictures of shapes. ", "my drawings: ", "look at these. ")


def chunk_text(scene: Scene, rng: np.random.Generator) -> str:
  """What a document says about the image just before it: a caption or a fact or two."""
  if rng.random() < 0.5:
    return caption(scene, rng)
  facts = []
  for _, question, answer in [sample_question(scene, rng) for _ in range(int(rng.integers(1, 3)))]:
    facts.append(f"{question} {answer}.")
  return " ".join(dict.fromkeys(facts))


def interleaved_text(scenes: list[Scene], rng: np.random.Generator) -> str:
  """A document of chunks `<image>text<|endofchunk|>`, one per scene, maybe an intro."""
  intro = _INTROS[int(rng.integers(len(_INTROS)))]
  chunks = [f"{IMAGE_TOKEN}{chunk_text(s, rng)}{END_OF_CHUNK_TOKEN}" for s in scenes]
  return intro + "".join(chunks)
