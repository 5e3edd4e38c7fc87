"""Layer 1, the planes: what an interrupt stops (asyncio tool tasks, worker threads,
process trees) and how it reaches them. Sees a session only as a PlaneHost.
"""
