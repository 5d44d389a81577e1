"""Data: text -> token shards (prepare.py), the shard format (shards.py), the loader (loader.py)."""
