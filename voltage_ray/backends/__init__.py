"""Model code behind small interfaces. Backends know nothing of Ray or HTTP."""
