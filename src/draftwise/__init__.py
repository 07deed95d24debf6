"""draftwise: lossless speculative decoding for PyTorch language models.

Public API: `LLM`, `SamplingParams`, `StructuredOutputsParams` (also `GuidedDecodingParams`),
`SpeculativeConfig`, `RequestOutput`, `CompletionOutput`, `Logprob`.
"""

from draftwise.api import LLM
from draftwise.outputs import CompletionOutput, Logprob, RequestOutput
from draftwise.config import SpeculativeConfig
from draftwise.constraints import GuidedDecodingParams, StructuredOutputsParams
from draftwise.sampling import SamplingParams
from draftwise.version import __version__

__all__ = ["LLM", "CompletionOutput", "GuidedDecodingParams", "Logprob", "RequestOutput", "SamplingParams",
           "SpeculativeConfig", "StructuredOutputsParams", "__version__"]
