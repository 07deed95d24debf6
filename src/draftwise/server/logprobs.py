"""Log-probabilities in OpenAI's two shapes: the legacy completions object and chat's.

The numbers come from the engine (`sampling.TokenLogprob`: the target model's own
distribution at each emitted position, raw logits, as vLLM reports by default); this
module only names the tokens and lays them out.
"""

from __future__ import annotations

from draftwise.sampling import TokenLogprob


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def completion(self, items: list[TokenLogprob], offset: int) -> dict:
        """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; offsets count
        characters from the start of the choice's text, beginning at `offset`."""
        tokens = [self.text(it.token) for it in items]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        tops = [{self.text(i): lp for i, lp in [*it.top, (it.token, it.logprob)]} for it in items]
        return {"tokens": tokens, "token_logprobs": [it.logprob for it in items], "top_logprobs": tops,
                "text_offset": offsets}

    def chat(self, items: list[TokenLogprob]) -> dict:
        """`{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}`."""
        return {"content": [dict(self._entry(it.token, it.logprob),
                                 top_logprobs=[self._entry(i, lp) for i, lp in it.top]) for it in items],
                "refusal": None}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
