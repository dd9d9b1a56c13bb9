"""The dlm worker's contract is defined once: its option fields are the proto's optional request fields, each a
sampler option (or `guided`), and the client, server and gateway share the same objects."""

from services.dlm import client, protocol
from services.gateway import dlm as gateway_dlm


def test_option_fields_are_the_proto_fields_and_sampler_options() -> None:
    from services.dlm.sampler import Options
    from services.rpc.tandem.v1 import dlm_pb2

    fields = dlm_pb2.DiffusionGenerateRequest.DESCRIPTOR.fields
    assert protocol.OPTION_FIELDS == tuple(f.name for f in fields if f.has_presence)
    assert set(protocol.OPTION_FIELDS) <= {*Options.__slots__, "guided"}


def test_client_server_and_gateway_share_one_definition() -> None:
    from services.dlm import server

    assert client.DLMChunk is server.DLMChunk is protocol.DLMChunk
    assert client.OPTION_FIELDS is gateway_dlm.OPTION_FIELDS is protocol.OPTION_FIELDS
    assert server.SERVICE == client.SERVICE == "tandem.v1.Diffusion"


def test_named_variants_set_only_request_options() -> None:
    assert set(protocol.VARIANT_OPTIONS) == {*protocol.VARIANTS, *protocol.ABLATIONS}
    for name, opts in protocol.VARIANT_OPTIONS.items():
        assert set(opts) <= set(protocol.OPTION_FIELDS) and "guided" in opts, name
