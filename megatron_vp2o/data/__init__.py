"""Tokenizers and SFT data."""
