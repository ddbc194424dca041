"""snapworker's tests: unit (no services) and functional (real services)."""
