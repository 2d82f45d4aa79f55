"""`embedq bridge`: message brokers in, vectors out.

A bridge consumes messages from a source broker, sends their texts to an
embedq server over one EncodeStream call with many messages in flight, and
publishes one result per input to a sink broker, in input order, acknowledging
each input only after its result is published (at least once). See
docs/bridge.md.
"""
