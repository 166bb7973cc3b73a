"""The wire contract both halves speak: the code generated from protos/memflow/v1/memory.proto (gen/), the one
module that builds and reads its messages (convert.py) and the K/V chunk framing (framing.py). MemoryClient
imports only this package of the gRPC side; the server (service/) imports it too.
"""
