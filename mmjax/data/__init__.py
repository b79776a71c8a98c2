"""Data: the embedded dataset, bring-your-own builders, tokenizer, grain pipelines.

Public API (the trainer and evaluation code against it):

  build_embedded(data_dir=None, size=4000, image_size=64, seed=0, vocab_size=256) -> BuildResult
  import_jsonl(data_dir, name, {split: jsonl_path}, image_dir) -> str
  default_data_dir() -> str          $MMJAX_DATA_DIR or ~/.cache/mmjax/data
  load_tokenizer(data_dir=None) -> Tokenizer;  Tokenizer.load(path) / .train(texts, vocab_size, path)
  Bucket(max_images, text_length, image_size)
  make_pipeline(data_dir, split, batch_size, bucket, seed, mixture, num_workers,
                shard_by_jax_process, bad_data, ...) -> Pipeline (iterator of batches with
                get_state() / set_state() / bad_data_counts)
  qa_records(data_dir, split, image_size) -> iterator of {id, images, question, answer}
  qa_prompt(question, answer=None), few_shot_prompt(shots, question), exact_match(pred, answer)

Images leave the pipeline as uint8 in [0, 255], resized but not normalised: the model
applies its encoder's mean/std (CLIP and SigLIP differ).
"""

from mmjax.data.builders import (BuildResult, build_embedded, dataset_names, default_data_dir,
                                 import_jsonl, load_tokenizer, open_split, tokenizer_path)
from mmjax.data.pipeline import DEFAULT_MIXTURE, Pipeline, example_dataset, make_pipeline
from mmjax.data.preprocess import BAD_REASONS, BadRecordError, Bucket, ExampleBuilder
from mmjax.data.qa import answer_from_generation, exact_match, few_shot_prompt, qa_prompt, qa_records
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.data.tokenizer import Tokenizer

__all__ = [
    "BAD_REASONS", "BadRecordError", "Bucket", "BuildResult", "DEFAULT_MIXTURE",
    "END_OF_CHUNK_TOKEN", "ExampleBuilder", "IMAGE_TOKEN", "Pipeline", "Tokenizer",
    "answer_from_generation", "build_embedded", "dataset_names", "default_data_dir",
    "example_dataset", "exact_match", "few_shot_prompt", "import_jsonl", "load_tokenizer",
    "make_pipeline", "open_split", "qa_prompt", "qa_records", "tokenizer_path",
]
