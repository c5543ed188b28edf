"""recur.modeling."""
