"""Decode the ``encoding_format: base64`` vectors of an embeddings response, as a client does
(the service only encodes them: ``protocol.embeddings.encode_vector``)."""

from __future__ import annotations

import base64

import numpy as np


def decode_base64(data: str) -> np.ndarray:
    """The inverse of ``encode_vector(..., "base64")``: little-endian float32."""
    return np.frombuffer(base64.b64decode(data), dtype="<f4")
