"""The data pipeline: tokenizers, built-in corpora, packing, token files and batches.

Each module does one job and takes what it needs as arguments; none reads the
run's configuration, so each can be tested alone and composed by the trainer.
"""
