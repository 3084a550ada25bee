"""Evaluation room: perplexity and KL-divergence measured like llama.cpp's llama-perplexity."""
