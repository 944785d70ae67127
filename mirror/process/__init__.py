"""Running it: workers, signals, TLS reload, systemd notification."""
