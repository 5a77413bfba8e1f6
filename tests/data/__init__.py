"""Tests of the data pipeline (ava/data)."""
