"""Serving: the Ray Serve application (app, ingress, OpenAI routes, model replicas), its config,
access control (auth) and error mapping, and the `epserve` command line (serve, demo, generate,
bench, experts, plan)."""
