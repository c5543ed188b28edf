"""recur.eval."""
