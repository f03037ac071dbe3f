"""A step on a worker: the step messages and their encoding, the ModelRunner (flat batch, forward,
sampling), the Ray worker roles and their step loop, the expert exchange between workers, and
step timing."""
