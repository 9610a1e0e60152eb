"""The Faust worker: the app, its tables and agents, and the batch protocol that
applies the core's plans to Kafka in the order exactness needs."""
