"""Storage tiers behind the local cache dir: an S3-compatible bucket (issue 13)."""
