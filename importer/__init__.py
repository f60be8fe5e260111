"""The import worker: turns a source into a raw disk on a volume (see docs/architecture.md)."""
