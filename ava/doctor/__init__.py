"""`ava doctor`: what this machine offers a run, and whether a multi-rank ZeRO-3 job can start on it."""
