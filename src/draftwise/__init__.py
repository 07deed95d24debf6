"""draftwise: lossless speculative decoding for PyTorch language models.

Public API: `LLM`, `SamplingParams`, `SpeculativeConfig`, `RequestOutput`, `CompletionOutput`.
"""

from draftwise.api import LLM, CompletionOutput, RequestOutput
from draftwise.config import SpeculativeConfig
from draftwise.sampling import SamplingParams
from draftwise.version import __version__

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "SpeculativeConfig", "__version__"]
