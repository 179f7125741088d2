"""Which session leaves a tier when it is full, and which comes up from disk early: LRU, FIFO, the
paper's scheduler-aware policy, the Belady bounds and the ``value`` policy. Pure Python (no torch):
the replay simulator uses them alone."""
