"""Request and response schemas, one module per endpoint, fields in the spec's order."""
