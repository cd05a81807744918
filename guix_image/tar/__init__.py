"""The tar format: its constants (format), a deterministic writer and a strict reader."""
