"""Generation over token ids: pure sampling functions and a KV-cache engine."""
