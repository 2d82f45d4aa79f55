"""Commands that wire several roles together (`embedq.apps`): `embedq serve`
(a private Redis, workers and a gRPC server in one command), `embedq status`
and the embedded Redis-compatible server they start.

The top layer but one (docs/architecture.md#import-layers): it may import the
server, the workers, the client and the shared core; none of those imports it.
"""
