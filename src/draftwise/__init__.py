"""draftwise: lossless speculative decoding for PyTorch language models.

Public API: `LLM`, `SamplingParams`, `SpeculativeConfig`, `RequestOutput`.
"""

from draftwise.api import LLM, RequestOutput
from draftwise.config import SpeculativeConfig
from draftwise.sampling import SamplingParams
from draftwise.version import __version__

__all__ = ["LLM", "RequestOutput", "SamplingParams", "SpeculativeConfig", "__version__"]
