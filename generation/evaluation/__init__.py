"""`cxr eval generation`: every task with its baselines in the same run, and the metrics."""
