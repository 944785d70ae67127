"""A pull-through caching mirror for OCI / Docker container registries."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Set at build time from the git tag (setuptools-scm, pyproject.toml).
    __version__ = version("registry-mirror")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0+unknown"
