"""The pull-through policy (proxy) and the single-flight downloads it starts."""
