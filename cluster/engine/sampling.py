"""SamplingParams: what a user asks of one generation, validated with errors naming the bad value."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_STOP_STRINGS, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS = 16, 256, 64  # what one request may ask
MAX_LOGIT_BIAS = 300  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most (generation also stops at the context length)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1: off
    min_p: float = 0.0  # drop tokens less likely than min_p * the most likely one
    seed: int | None = None  # reproducible sampling: same seed, same tokens, in any batch
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens (beside the model's end-of-sequence)
    ignore_eos: bool = False  # keep going past end-of-sequence tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the output
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive, multiply negative logits of seen tokens
    # OpenAI: added to the logits of these token ids before penalties and selection ((id, bias) pairs
    # or a dict; bias in [-100, 100]); logprobs stay those of the model
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # return the sampled token's logprob and the top n (0..20)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (or -1 for off)"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (0 < self.repetition_penalty <= 10, "repetition_penalty", "in (0, 10]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"in 0..{MAX_LOGPROBS}"),
            (self.seed is None or isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            # every stop string is searched in the text after every token: bounded per request
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings"),
            (all(len(s) <= MAX_STOP_LENGTH for s in self.stop), "stop", f"strings of at most {MAX_STOP_LENGTH} characters"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "integers >= 0"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} entries"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
             "token ids >= 0 with biases in [-100, 100]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
