"""Generative TRM: a Tiny Recursive Model as a causal Japanese language model."""
