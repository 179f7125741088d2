"""The tiers below DRAM: the `LowerTier` interface, the local disk and its file format, the shared
Redis tier and its values, and the disk in front of a shared tier."""
