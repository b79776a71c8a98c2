"""Experiment configs (`get_config()` files); installed as `mmjax.configs`."""
