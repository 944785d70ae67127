"""A pull-through caching mirror for OCI / Docker container registries."""

__version__ = "0.1.0"
