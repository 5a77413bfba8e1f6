"""Ava's benchmark scripts: each prints a table and can write JSON results."""
