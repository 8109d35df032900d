"""Developer tools: the `kefu` command and what a laptop needs to run kefu (not shipped to production)."""
