"""The fault-injection suite: each module runs its own nats-server, S3 endpoint and service
processes (loopback only), breaks one of them, and asserts on the events that follow."""
