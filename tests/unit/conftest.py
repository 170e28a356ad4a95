"""Unit tier: pure functions only — no processes, no network, no cluster, no torch."""
