"""recur.data."""
