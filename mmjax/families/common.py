"""What the families that train on a data directory share: where the data and the run's
tokenizer are, how `config.model` dicts become dataclasses, the mixture spec.

A work directory keeps its own copy of the tokenizer it trains with (`TOKENIZER_COPY`,
`mmjax.train.workdir.record_files`), so retraining the data directory's tokenizer changes
nothing for a run that exists.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from mmjax import data as data_lib
from mmjax.families import base


def replace_fields(cls, values: ml_collections.ConfigDict | dict, where: str, **forced):
  """`cls(**values, **forced)`, naming `config.model.<where>` and the valid fields when `values` holds others."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.model{'.' + where if where else ''} has fields {unknown} that {cls.__name__} does not; expected {sorted(known)}")
  values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
  values.update(forced)
  return cls(**values)


def with_new_fields(cls, values: dict) -> dict:
  """`values` (a recorded dataclass dict) with the fields `cls` gained since it was recorded
  set to their defaults, which reproduce the behaviour from before they existed."""
  defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
  return {**{k: v for k, v in defaults.items() if k not in values}, **values}


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.abspath(os.path.expanduser(str(config.data.dir) or data_lib.default_data_dir()))


# A work directory's own copy of the tokenizer it trains with (`workdir.record_files`).
TOKENIZER_COPY = "tokenizer.model"


def tokenizer_file(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The tokenizer a run uses: its work directory's copy once there is one (the data
  directory's may have been retrained since, and the checkpoints' ids are the copy's),
  else the data directory's."""
  if workdir is not None:
    copy = os.path.join(workdir, TOKENIZER_COPY)
    if os.path.exists(copy):
      return copy
  d = data_dir(config)
  try:
    return data_lib.tokenizer_path(d)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"no dataset in {d!r} ({e}); build it with `mmjax data build --data-dir {d}`") from None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | None = None) -> data_lib.Tokenizer:
  return data_lib.Tokenizer.load(tokenizer_file(config, workdir))


def read_tokenizer(config: ml_collections.ConfigDict, workdir: str | None) -> bytes:
  path = tokenizer_file(config, workdir)
  with open(path, "rb") as f:
    content = f.read()
  if workdir is not None and path == os.path.join(workdir, TOKENIZER_COPY):
    try:
      with open(tokenizer_file(config), "rb") as f:
        changed = f.read() != content
    except (OSError, ValueError):
      changed = False
    if changed:
      logging.getLogger(__name__).warning(
          "the tokenizer of data directory %s is not the one %s was trained with; using the work directory's "
          "copy %s (train into a new --workdir to use the new one)", data_dir(config), workdir, path)
  return content


def parse_mixture(spec: str) -> dict[str, float] | str | None:
  """"interleaved:1,qa:1" -> {"interleaved": 1.0, "qa": 1.0}; "" -> the default; "sqrt" as is."""
  spec = spec.strip()
  if not spec:
    return None
  if spec == "sqrt":
    return spec
  out = {}
  for part in spec.split(","):
    if ":" not in part:
      raise ValueError(f"data.mixture part {part!r} must look like 'name:weight'")
    name, w = part.split(":", 1)
    out[name.strip()] = float(w)
  return out


def pipelines(config: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer, bucket: data_lib.Bucket, *,
              builder=None, default_mixture: str = ""):
  """(train_data, val_data) for a Task: the data directory's pipelines in `bucket`, as
  `config.data` says (mixture, workers, bad-record limit); `data.batch_size` is the global
  batch, of which each process reads its rows (or all of them). `builder` (record ->
  example, `make_pipeline`'s) replaces the bucket's example builder; `default_mixture` is
  the mixture when `data.mixture` is empty (else the pipeline's default)."""
  d = data_dir(config)
  bsz = base.process_batch_size(config)
  by_process = bool(config.data.get("shard_by_process", True))
  mixture = parse_mixture(str(config.data.get("mixture", "")) or default_mixture)
  max_bad = int(config.data.get("max_consecutive_bad_records",
                                data_lib.pipeline.DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS))

  def train_data():
    return data_lib.make_pipeline(d, "train", batch_size=bsz, bucket=bucket, seed=int(config.seed), mixture=mixture,
                                  num_workers=int(config.data.num_workers), tokenizer=tokenizer,
                                  shard_by_jax_process=by_process, max_consecutive_bad_records=max_bad,
                                  builder=builder)

  def val_data():
    return data_lib.make_pipeline(d, "validation", batch_size=bsz, bucket=bucket, seed=0, mixture=mixture,
                                  num_epochs=1, shuffle=False, tokenizer=tokenizer, shard_by_jax_process=by_process,
                                  max_consecutive_bad_records=max_bad, builder=builder)

  return train_data, val_data


def qa_rows(records, answers: list[str]) -> tuple[float, list[dict]]:
  """(exact match, one row per question) of generated `answers` to the embedded `qa`
  `records` they answer, each row its question, answer, the prediction cut from the
  generation and whether it matched."""
  rows = []
  for record, answer in zip(records, answers, strict=True):
    question, truth = (record[k].decode() if isinstance(record[k], bytes) else str(record[k])
                       for k in ("question", "answer"))
    rows.append({"question": question, "answer": truth, "prediction": data_lib.answer_from_generation(answer),
                 "correct": bool(data_lib.exact_match(answer, truth))})
  return (sum(r["correct"] for r in rows) / len(rows) if rows else 0.0), rows
