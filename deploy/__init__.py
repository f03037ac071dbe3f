"""Serving entry points: the `epserve` command line (Ray Serve applications arrive with #5)."""
