"""The sentencepiece tokenizer: special tokens are single ids, text round-trips."""

import io
import pickle

import pytest
import sentencepiece as spm

from mmjax.data.tokenizer import Tokenizer

TEXT = ("some pictures. <image>Question: how many shapes are there? Answer: 3<|endofchunk|>"
        "<image>from left to right: a red circle and a blue square.<|endofchunk|>")


def test_special_strings_map_to_their_single_ids(tokenizer):
  ids = tokenizer.encode(TEXT)
  assert ids.count(tokenizer.image_id) == 2
  assert ids.count(tokenizer.end_of_chunk_id) == 2
  assert tokenizer.encode("<image>") == [tokenizer.image_id]
  assert tokenizer.encode("<|endofchunk|>") == [tokenizer.end_of_chunk_id]
  named = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id,
           tokenizer.end_of_chunk_id}
  assert len(named) == 5 and max(named) < tokenizer.vocab_size
  assert tokenizer.id_to_piece(tokenizer.image_id) == "<image>"


def test_decode_inverts_encode_and_drops_padding(tokenizer):
  ids = tokenizer.encode(TEXT)
  assert tokenizer.decode(ids) == TEXT
  assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]) == TEXT


def test_encoding_splits_cleanly_before_an_image(tokenizer):
  # Prompts built chunk by chunk tokenize exactly like the whole text.
  head, tail = TEXT.split("<image>", 1)
  assert tokenizer.encode(head) + tokenizer.encode("<image>" + tail) == tokenizer.encode(TEXT)


def test_tokenizer_survives_pickling_for_grain_workers(tokenizer):
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert copy.encode(TEXT) == tokenizer.encode(TEXT)
  assert copy.image_id == tokenizer.image_id


def test_train_writes_a_model_that_load_reads_back(tmp_path):
  texts = ["a red circle and a blue square.", "<image>how many? 2<|endofchunk|>"] * 50
  trained = Tokenizer.train(texts, 64, tmp_path / "t.model")
  loaded = Tokenizer.load(tmp_path / "t.model")
  assert loaded.encode(texts[1]) == trained.encode(texts[1])
  assert loaded.encode(texts[1])[0] == loaded.image_id


def test_load_adds_missing_special_tokens_without_moving_existing_ids(tmp_path):
  # A foreign model (like LLaMA's): no <image>, no <|endofchunk|>, no padding piece.
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["the red circle is left of the square."] * 100), model_writer=writer,
      vocab_size=40, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  (tmp_path / "foreign.model").write_bytes(writer.getvalue())
  plain = spm.SentencePieceProcessor(model_proto=writer.getvalue())
  tok = Tokenizer.load(tmp_path / "foreign.model")
  size = plain.get_piece_size()
  assert tok.vocab_size == size + 3
  assert {tok.image_id, tok.end_of_chunk_id, tok.pad_id} == {size, size + 1, size + 2}
  assert tok.encode("the red circle") == plain.encode("the red circle")
  assert tok.encode("the<image>") == plain.encode("the") + [tok.image_id]


def test_train_rejects_an_empty_corpus(tmp_path):
  with pytest.raises(Exception):
    Tokenizer.train([], 64, tmp_path / "empty.model")
