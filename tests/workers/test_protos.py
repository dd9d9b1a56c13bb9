"""The committed gRPC stubs are exactly what `python -m services.rpc.gen` makes from proto/."""

from services.rpc import gen


def test_stubs_are_fresh() -> None:
    assert gen.check() == []
