"""fast layer."""
