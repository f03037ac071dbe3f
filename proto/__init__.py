"""gRPC API definitions and generated stubs (arrive with the front-door issue)."""
