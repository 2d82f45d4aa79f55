"""embedq gRPC server (`embedq.server`): front, queue and cache stages.

It never loads the model: workers publish what the server needs to know
about a model (fingerprint, dimension, pooling) in Redis.
"""
