"""API keys, plans, and the shared limiter actor."""
