"""The store's 8-bit KV format for the host tiers: the codes (`codec`) and a chunk's views over them
(`segment`). See docs/store.md, "8-bit KV"."""
