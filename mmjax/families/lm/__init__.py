"""The `lm` family: a plain decoder-only language model (mmjax's LLaMA-style decoder)."""
