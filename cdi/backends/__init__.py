"""The port the controllers use, with its embedded (SQLite) and Kubernetes adapters."""
