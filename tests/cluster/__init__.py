"""Tests of the engine, the model and its loading, and expert parallelism on Ray, by role."""
