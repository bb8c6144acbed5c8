"""pdserve.proto: the gRPC contract between router, prefill and decode.

    pdserve.proto             package pdserve.v1: the only definition of inter-service messages
    pdserve_pb2[_grpc].py     generated stubs; regenerate with `python -m pdserve.proto.generate`
    convert.py                SamplingParams / logprobs / finish reasons <-> messages

Torch-free: the router imports this package.
"""
