"""`mmjax eval --task` on a sharded mesh and with beam search: the same answers on one device
and on eight, and beam search of one token equal to greedy decoding (the run: test_fewshot.py's
fixtures, trained again for this file)."""

from mmjax.train import fewshot
from tests.train.test_fewshot import _answers, _options, data_dir, workdir  # noqa: F401 (fixtures)


def test_eight_devices_give_the_answers_of_one(workdir):
  one, = fewshot.run(workdir, ["vqa:embedded"], _options(shots=(2,), num_devices=1))
  eight, = fewshot.run(workdir, ["vqa:embedded"], _options(shots=(2,), num_devices=8))
  assert one["devices"] == 1 and eight["devices"] == 8 and eight["batch_split"] == 8
  assert _answers(one) == _answers(eight)
  assert one["runs"][0]["scores"] == eight["runs"][0]["scores"]


def test_beam_search_of_one_token_answers_what_greedy_does(workdir):
  # With one new token every beam finishes at once; the best is the most probable token.
  greedy, = fewshot.run(workdir, ["vqa:embedded"], _options(max_new_tokens=1))
  beams, = fewshot.run(workdir, ["vqa:embedded"], _options(max_new_tokens=1, num_beams=3))
  assert beams["decoding"] == {"method": "beam search", "num_beams": 3, "length_penalty": 0.0, "max_new_tokens": 1}
  assert _answers(beams) == _answers(greedy)
