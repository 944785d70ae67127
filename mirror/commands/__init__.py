"""The operator commands: warm, verify, status, export/import."""
