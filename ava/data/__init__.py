"""The data pipeline: tokenizers (with a BPE trained on the corpus), built-in corpora, local sources
read with `datasets`, mixing, packing, token files, and batches held in memory, streamed or cut as
random windows.

Each module does one job and takes what it needs as arguments; none but
`setup` reads the run's configuration, so each can be tested alone. `setup`
composes them from the data: section into a rank's training and evaluation
batches. It lives here, not in `ava.train`, because it needs only the config
and this package, and retrieval (`ava.rag`) builds its store from the same
data without importing the trainer.
"""
