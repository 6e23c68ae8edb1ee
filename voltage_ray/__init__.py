"""voltage_ray: the VoltageGPU API, an OpenAI-compatible inference service on Ray Serve."""

__version__ = "0.1.0"
