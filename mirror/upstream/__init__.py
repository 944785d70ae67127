"""Upstream registries: the HTTP client (all wire details), credentials and
tokens."""
