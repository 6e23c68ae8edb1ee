"""The HTTP ingress: FastAPI app, thin routes, auth, SSE framing, the Ingress deployment."""
