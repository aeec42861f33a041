"""Sharing clusters: between xdist workers, runs after one another (reuse), warm hosts."""
