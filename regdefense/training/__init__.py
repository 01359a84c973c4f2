"""Training: the assembly of a run's parts, the loop and its services, extra data, restoring, a run end to end."""
