"""Inference: cached generation and sampling."""
