"""The spec, as pure functions: names, references, digests, media types, routing,
challenges, error codes. Imports nothing of ours."""
