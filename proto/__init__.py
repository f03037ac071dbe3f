"""epserve's gRPC API (`epserve.v1.Generation`): the .proto, its generated stubs and conversions.

Installed as the package `epserve_proto` (the name `proto` belongs to proto-plus, a dependency of
Ray's dependencies).
"""
