"""Hedgerow's own model code for the Llama family: a forward of plain tensor operations that the
runner drives with its own KV cache and tree mask through an ``Attend`` callable, compilable with
``torch.compile(fullgraph=True)`` and capturable as a CUDA graph.

``native_config`` (or ``load_native``) raises ``UnsupportedModel`` for anything it cannot run
exactly as transformers does, so the caller can fall back to transformers.
"""

from hedgerow.server.models.native.config import NativeConfig, RopeScaling, UnsupportedModel, native_config
from hedgerow.server.models.native.llama import Attend, NativeCausalLM
from hedgerow.server.models.native.load import from_transformers, load_native

__all__ = [
    "Attend", "NativeCausalLM", "NativeConfig", "RopeScaling", "UnsupportedModel", "from_transformers", "load_native",
    "native_config",
]
