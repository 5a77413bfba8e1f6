"""The processes a run lives in: the process group and rendezvous, lost ranks, stop signals, injected faults,
and the machine facts a run records."""
