"""Local development servers (real brokers run as plain processes, no Docker needed)."""
