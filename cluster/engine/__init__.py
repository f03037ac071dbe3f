"""Requests to steps: the EngineCore loop (schedule, execute, update), the scheduler and its cache
plan, sequences, tokenisation and detokenisation, sampling parameters, metrics, and the executors
that hand each step to the workers (in process, or on Ray)."""
