"""The tokenizer.json backend: the sentencepiece tokenizer's interface over Hugging Face `tokenizers`.

Every tokenizer.json here is trained in the test with `tokenizers` itself (a few sentences,
milliseconds): a GPT-2-like byte-level BPE (`<|endoftext|>` only), a GPT-NeoX-like one
(with `<|padding|>`), a sentencepiece-like Unigram (Metaspace, `<s>` put first by the
post-processor) and a BERT-like WordPiece.
"""

import importlib.util
import io
import json
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer as HfTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmjax.data.preprocess import Bucket, ExampleBuilder
from mmjax.data.tokenizer import Tokenizer

CORPUS = ["the red circle is left of the blue square.", "how many shapes are there? Answer: 3",
          "from left to right: a green triangle and a yellow circle.", "héllo wörld, 日本語のテキスト ✓"] * 20
TEXT = ("some pictures. <image>Question: how many shapes are there? Answer: 3<|endofchunk|>"
        "<image>from left to right: a red circle and a blue square.<|endofchunk|>")
ROUND_TRIP_TEXTS = [
    "the red circle is left of the blue square.",
    "héllo wörld, 日本語 ✓ — naïve café 🙂",
    "  two leading spaces,\ttabs\tand\nnewlines\n\n and trailing spaces  ",
    "<image>a red circle<|endofchunk|>",
    "before <image> after<|endofchunk|> <image>\nnext line <|endofchunk|>",
    "<image><image><|endofchunk|><|endofchunk|>",
    "",
]


def _byte_level_bpe(special_tokens: list[str]) -> HfTokenizer:
  tok = HfTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer=trainer)
  return tok


def _unigram_like_sentencepiece() -> HfTokenizer:
  tok = HfTokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                    show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tok


def _wordpiece_like_bert() -> HfTokenizer:
  tok = HfTokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                      show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
  return tok


@pytest.fixture(scope="module")
def gpt2_like() -> HfTokenizer:
  return _byte_level_bpe(["<|endoftext|>"])


def _save(tok: HfTokenizer, directory, name: str = "tokenizer.json") -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), name)
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def gpt2_file(gpt2_like, tmp_path_factory) -> str:
  return _save(gpt2_like, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def tokenizer(gpt2_file) -> Tokenizer:
  return Tokenizer.load(gpt2_file)


def test_byte_level_bpe_appends_the_three_missing_special_tokens_after_its_vocabulary(gpt2_like, tokenizer):
  size = gpt2_like.get_vocab_size()
  assert tokenizer.kind == "tokenizer.json"
  assert tokenizer.vocab_size == size + 3
  assert [tokenizer.image_id, tokenizer.end_of_chunk_id, tokenizer.pad_id] == [size, size + 1, size + 2]
  assert tokenizer.bos_id == tokenizer.eos_id == gpt2_like.token_to_id("<|endoftext|>")
  assert tokenizer.unk_id == -1  # a byte-level BPE has none: every string encodes
  assert [tokenizer.id_to_piece(i) for i in (tokenizer.image_id, tokenizer.end_of_chunk_id, tokenizer.pad_id)] == [
      "<image>", "<|endofchunk|>", "<pad>"]


def test_existing_ids_do_not_move(gpt2_like, tokenizer):
  for text in CORPUS[:4]:
    assert tokenizer.encode(text) == gpt2_like.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_inverts_encode(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_strings_map_to_their_single_ids(tokenizer):
  ids = tokenizer.encode(TEXT)
  assert ids.count(tokenizer.image_id) == 2 and ids.count(tokenizer.end_of_chunk_id) == 2
  assert tokenizer.encode("<image>") == [tokenizer.image_id]
  assert tokenizer.encode("<|endofchunk|>") == [tokenizer.end_of_chunk_id]
  assert tokenizer.encode(" <image> ") == tokenizer.encode(" ") + [tokenizer.image_id] + tokenizer.encode(" ")


def test_encoding_splits_cleanly_before_an_image(tokenizer):
  head, tail = TEXT.split("<image>", 1)
  assert tokenizer.encode(head) + tokenizer.encode("<image>" + tail) == tokenizer.encode(TEXT)


def test_padding_is_its_own_id_and_never_encoded(tokenizer):
  others = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id, tokenizer.end_of_chunk_id}
  assert tokenizer.pad_id not in others
  assert all(tokenizer.pad_id not in tokenizer.encode(t) for t in ROUND_TRIP_TEXTS + CORPUS[:4] + [TEXT])


def test_prompt_starts_with_bos_and_decode_drops_bos_eos_and_padding(tokenizer):
  ids = tokenizer.encode_prompt(TEXT)
  assert ids[0] == tokenizer.bos_id and ids[1:] == tokenizer.encode(TEXT)
  assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]) == TEXT


def test_special_ids_are_stable_across_reload_pickling_and_resaving(gpt2_file, tokenizer, tmp_path):
  names = ("vocab_size", "pad_id", "bos_id", "eos_id", "unk_id", "image_id", "end_of_chunk_id")
  expected = [getattr(tokenizer, n) for n in names]
  pickled = pickle.loads(pickle.dumps(tokenizer))
  twice = pickle.loads(pickle.dumps(pickled))
  # A file saved with the special tokens already in it: nothing is added a second time.
  resaved = HfTokenizer.from_file(gpt2_file)
  resaved.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t in ("<image>", "<|endofchunk|>", "<pad>")])
  for other in (Tokenizer.load(gpt2_file), pickled, twice, Tokenizer.load(_save(resaved, tmp_path))):
    assert [getattr(other, n) for n in names] == expected
    assert other.encode(TEXT) == tokenizer.encode(TEXT)


def test_a_file_that_has_image_tokens_keeps_their_ids(tmp_path):
  tok = _byte_level_bpe(["<|endoftext|>", "<|padding|>", "<|endofchunk|>", "<image>"])  # as GPT-NeoX + extras
  loaded = Tokenizer.load(_save(tok, tmp_path))
  assert (loaded.image_id, loaded.end_of_chunk_id, loaded.pad_id) == (3, 2, 1)
  assert loaded.vocab_size == tok.get_vocab_size()
  assert loaded.encode("<image>x<|endofchunk|>") == [3] + tok.encode("x").ids + [2]


def test_an_image_token_in_the_model_vocabulary_becomes_a_single_id(gpt2_like, tmp_path):
  # "<image>" learnt as an ordinary BPE token (not an added token): its id is kept, and the
  # string always encodes to it, also where BPE would have split it differently.
  spec = json.loads(gpt2_like.to_str())
  image_id = max(spec["model"]["vocab"].values()) + 1
  spec["model"]["vocab"]["<image>"] = image_id
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(spec))
  loaded = Tokenizer.load(path)
  assert loaded.image_id == image_id
  assert loaded.encode("a<image>b") == loaded.encode("a") + [image_id] + loaded.encode("b")


def test_padding_named_by_the_file_is_used_unless_it_is_eos(gpt2_like, tmp_path):
  neox = _byte_level_bpe(["<|endoftext|>", "<|padding|>"])
  assert Tokenizer.load(_save(neox, tmp_path / "neox")).pad_id == neox.token_to_id("<|padding|>")
  # Qwen and GPT-2 setups pad with <|endoftext|>: that is EOS here, so a <pad> of its own is added.
  eos_padded = HfTokenizer.from_str(gpt2_like.to_str())
  eos_padded.enable_padding(pad_id=0, pad_token="<|endoftext|>")
  loaded = Tokenizer.load(_save(eos_padded, tmp_path / "eos_padded"))
  assert loaded.pad_id == gpt2_like.get_vocab_size() + 2 and loaded.pad_id != loaded.eos_id


def test_batch_padding_and_truncation_in_the_file_do_not_touch_encode(gpt2_like, tmp_path):
  batched = HfTokenizer.from_str(gpt2_like.to_str())
  batched.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
  batched.enable_truncation(max_length=3)
  plain = gpt2_like.encode(CORPUS[0]).ids
  assert len(plain) > 3
  assert Tokenizer.load(_save(batched, tmp_path)).encode(CORPUS[0]) == plain


def test_unigram_converted_from_sentencepiece_takes_bos_from_the_post_processor(tmp_path):
  tok = _unigram_like_sentencepiece()
  loaded = Tokenizer.load(_save(tok, tmp_path))
  assert (loaded.bos_id, loaded.eos_id, loaded.unk_id) == (1, 2, 0)
  assert loaded.pad_id == tok.get_vocab_size() + 2
  assert loaded.encode("<image>") == [loaded.image_id]
  assert loaded.decode(loaded.encode("the red circle")) == "the red circle"
  # OPT's files put </s> first: the post-processor wins over the names.
  tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
  assert Tokenizer.load(_save(tok, tmp_path / "opt_like")).bos_id == 2


def test_wordpiece_like_bert_uses_cls_sep_and_pad(tmp_path):
  tok = _wordpiece_like_bert()
  loaded = Tokenizer.load(_save(tok, tmp_path))
  assert (loaded.pad_id, loaded.unk_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2, 3)
  assert loaded.vocab_size == tok.get_vocab_size() + 2
  ids = loaded.encode("the red circle<image>")
  assert ids[-1] == loaded.image_id and loaded.image_id not in ids[:-1]


def test_a_text_only_example_is_built_from_a_tokenizer_json(tokenizer):
  text = "<image>a red circle.<|endofchunk|>"
  example = ExampleBuilder(tokenizer, Bucket(max_images=0, text_length=32))({"text": text})
  text_ids = [i for i in tokenizer.encode(text) if i != tokenizer.image_id]
  ids = [tokenizer.bos_id] + text_ids + [tokenizer.eos_id]
  np.testing.assert_array_equal(example["input_ids"][:len(ids)], ids)
  assert (example["input_ids"][len(ids):] == tokenizer.pad_id).all()
  assert example["loss_mask"].sum() == len(ids) - 1


def _spm_model() -> bytes:
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[:3] * 30), model_writer=writer, vocab_size=40,
                                 hard_vocab_limit=False, minloglevel=2)
  return writer.getvalue()


def test_load_chooses_the_backend_by_the_bytes_not_the_name(gpt2_file, tmp_path):
  # A work directory keeps its copy as tokenizer.model, whatever it holds.
  copy = tmp_path / "workdir" / "tokenizer.model"
  copy.parent.mkdir()
  copy.write_bytes(open(gpt2_file, "rb").read())
  assert Tokenizer.load(copy).kind == "tokenizer.json"
  assert Tokenizer(copy.read_bytes()).encode(TEXT) == Tokenizer.load(gpt2_file).encode(TEXT)
  (tmp_path / "spm.json").write_bytes(_spm_model())
  assert Tokenizer.load(tmp_path / "spm.json").kind == "sentencepiece"


def test_a_directory_is_read_through_its_tokenizer_file_preferring_the_sentencepiece_model(gpt2_file, tmp_path):
  (tmp_path / "tokenizer.json").write_bytes(open(gpt2_file, "rb").read())
  assert Tokenizer.load(tmp_path).kind == "tokenizer.json"
  (tmp_path / "tokenizer.model").write_bytes(_spm_model())
  assert Tokenizer.load(tmp_path).kind == "sentencepiece"


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x00\x01\x02 not a model \xff", "neither a sentencepiece model nor a tokenizer.json"),
    (b"hello world\n", "neither a sentencepiece model nor a tokenizer.json"),
    (b'{"architectures": ["LlamaForCausalLM"], "vocab_size": 32000}', "no \"model\" object"),
    (b'{"model": {"type": "NoSuchModel"}}', "tokenizers"),
    (b"[1, 2, 3]", "neither a sentencepiece model nor a tokenizer.json"),
])
def test_a_file_that_is_no_tokenizer_is_a_value_error_naming_it(tmp_path, content, message):
  path = tmp_path / "config.json"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as info:
    Tokenizer.load(path)
  assert str(path) in str(info.value) and "expected" in str(info.value)


def test_a_tokenizer_json_without_bos_or_eos_is_a_value_error(tmp_path):
  path = _save(_byte_level_bpe([]), tmp_path)
  with pytest.raises(ValueError, match=r"no BOS or no EOS.*expected one of"):
    Tokenizer.load(path)


def test_missing_paths_are_value_errors_naming_them(tmp_path):
  with pytest.raises(ValueError, match=r"no tokenizer at .*nowhere.json.*expected"):
    Tokenizer.load(tmp_path / "nowhere.json")
  with pytest.raises(ValueError, match=r"holds no tokenizer.*tokenizer.model or tokenizer.json"):
    Tokenizer.load(tmp_path)


def _transformers_or_skip():
  if importlib.util.find_spec("transformers") is None:
    if os.environ.get("MMJAX_REQUIRE_PARITY") == "1":
      pytest.fail("MMJAX_REQUIRE_PARITY=1 but transformers is not installed (the parity extra)")
    pytest.skip("transformers is not installed (the parity extra)")
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers


def test_ids_equal_transformers_fast_tokenizer_on_the_same_file(gpt2_file, tmp_path):
  transformers = _transformers_or_skip()
  with_specials = _save(_byte_level_bpe(["<|endoftext|>", "<|padding|>", "<|endofchunk|>", "<image>"]), tmp_path)
  for path, texts in ((gpt2_file, ROUND_TRIP_TEXTS[:3] + CORPUS[:4]), (with_specials, ROUND_TRIP_TEXTS + [TEXT])):
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    ours = Tokenizer.load(path)
    for text in texts:
      assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
