"""Plumbing shared by the three servers: flags, logs, metrics, errors, health, assets."""
