"""Developer tools (`embedq.tools`): `embedq bench` and the scenarios beside it,
the bridge benchmark, and the generators of checked-in files (`python -m
embedq.tools.protogen`, `python -m embedq.tools.apidoc`).

They may import anything; nothing that runs in production imports them
(docs/architecture.md#import-layers; tests/test_layers.py).
"""
