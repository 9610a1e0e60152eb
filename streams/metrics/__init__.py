"""What Prometheus scrapes: the exporter reads the worker's state and never changes it."""
