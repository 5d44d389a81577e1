"""Training: the loop, optimizer and lr schedule, metrics."""
