"""The chat layer: `ChatSession` (multi-turn chat over a patched model and a store) and its restore
path, its turns, the paper's buffer rule per session, and the sliding layers' window entries."""
