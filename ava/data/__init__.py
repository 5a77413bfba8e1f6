"""The data pipeline: tokenizers (with a BPE trained on the corpus), built-in corpora, local sources
read with `datasets`, mixing, packing, token files, and batches held in memory or streamed.

Each module does one job and takes what it needs as arguments; none reads the
run's configuration, so each can be tested alone and composed by the trainer.
"""
