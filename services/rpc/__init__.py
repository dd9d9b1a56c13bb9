"""Generated gRPC stubs for proto/tandem/v1 (made by `python -m services.rpc.gen`; never edit by hand)."""
