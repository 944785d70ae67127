"""The local cache: content store, index, locks, eviction, background maintenance."""
