"""draftwise: lossless speculative decoding for PyTorch language models.

Public API: `LLM`, `SamplingParams`, `SpeculativeConfig`, `RequestOutput`, `CompletionOutput`, `Logprob`.
"""

from draftwise.api import LLM
from draftwise.outputs import CompletionOutput, Logprob, RequestOutput
from draftwise.config import SpeculativeConfig
from draftwise.sampling import SamplingParams
from draftwise.version import __version__

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "SpeculativeConfig", "__version__"]
