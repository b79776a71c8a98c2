"""Weight import from PyTorch originals: open_flamingo state_dicts, HF safetensors."""
