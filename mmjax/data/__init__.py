"""Data: the embedded dataset, bring-your-own builders, tokenizer, grain pipelines."""
