"""Tooling for running tunebus on one machine (the `local` extra): the embedded stack
(`stack`: nats-server with every role's user, an S3 endpoint, the services as processes), its
supervisor, the tiny generated model and the sample data. Services never import it."""
