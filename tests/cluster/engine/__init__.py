"""The engine: scheduling, sampling, batching, async scheduling, speculative decoding, decode graphs."""
