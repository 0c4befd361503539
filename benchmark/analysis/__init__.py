"""Figure commands that reproduce analyses of the papers (one module per method)."""
