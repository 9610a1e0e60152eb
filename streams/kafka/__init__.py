"""Kafka at the edges: reading topics, the embedded broker, client security, the
producers' partitioners and the publisher API."""
