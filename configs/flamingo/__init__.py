"""Flamingo experiment configs."""
