"""Model server deployments (ChatServer, EmbeddingServer, ImageServer) and their builder
(the Ingress over them has its own: ``ingress/builder.py``)."""
