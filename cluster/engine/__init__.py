"""Requests to steps: the EngineCore loop (schedule, execute, update), the scheduler and its cache
and memory plans, sequences, tokenisation and detokenisation, sampling parameters, metrics; the
executors that hand each step to the workers (in process, or on Ray) are in `executors/`."""
