"""Python stubs of ``proto/hedgerow/v1/generation.proto`` (generated; do not edit by hand).

Regenerate after changing the .proto, from the repository root::

    python -m hedgerow.server.rpc.generate

``tests/test_server.py`` checks that the committed stubs are what that command produces.
"""
