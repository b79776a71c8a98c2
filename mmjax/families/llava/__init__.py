"""The LLaVA family (LLaVA-1.5 and LLaVA-NeXT): see family.py."""
