"""recur.train."""
