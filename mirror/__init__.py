"""A pull-through caching mirror for OCI / Docker container registries."""

try:
    # Written from the git tag at install time (setuptools-scm's version_file, pyproject.toml).
    from mirror._version import __version__ as __version__
except ImportError:  # running from a tree that was never installed
    __version__ = "0+unknown"
