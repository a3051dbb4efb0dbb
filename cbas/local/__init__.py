"""The embedded backend: everything on this machine, no cloud account needed."""
