"""Executors hand the engine's steps to a model instance: in this process (`local.LocalExecutor`) or
across Ray actors (`ray_executor.RayExecutor`, with its placement control and its recovery from
lost workers)."""
