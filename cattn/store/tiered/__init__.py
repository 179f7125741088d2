"""`TieredStore`: the pinned DRAM pool over a lower tier, its index and lock, chunk bookkeeping,
demotion and promotion, and layer-wise reads from disk."""
