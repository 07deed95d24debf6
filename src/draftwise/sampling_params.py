"""vLLM's module name for the request parameters (`vllm.sampling_params`), so that code
importing `SamplingParams` or `StructuredOutputsParams` from it runs with `vllm` changed
to `draftwise`."""

from draftwise.constraints.spec import GuidedDecodingParams, StructuredOutputsParams
from draftwise.sampling import SamplingParams

__all__ = ["GuidedDecodingParams", "SamplingParams", "StructuredOutputsParams"]
