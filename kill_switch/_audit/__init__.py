"""Layer 1, durability: the SQLite audit store, its hash chain and its queries (the one
place that imports aiosqlite).
"""
