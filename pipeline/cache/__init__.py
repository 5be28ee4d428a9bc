"""A score cache shared by runs, and exact dedup across a run (see cache.py, key.py, segment.py,
compact.py, dedup.py, runwide.py; docs/CACHE.md)."""

from pipeline.cache.cache import PairCache, open_cache, prepare

__all__ = ["PairCache", "open_cache", "prepare"]
