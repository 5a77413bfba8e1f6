"""Ava: a DeepSpeed-centric toolkit for training GPT-style and Mixture-of-Experts models."""

__version__ = "0.1.0"
