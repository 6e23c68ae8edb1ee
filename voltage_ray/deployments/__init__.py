"""Model server deployments (ChatServer, EmbeddingServer, ImageServer) and their builder."""
