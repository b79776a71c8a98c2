"""Metrics of the benchmarks, equal to their reference implementations: VQA accuracy with
OpenFlamingo's or lmms-eval's answer post-processing (`vqa`), and the COCO caption metrics
CIDEr-D, BLEU-4 and ROUGE-L (`captions`). docs/evaluation.md describes them."""
