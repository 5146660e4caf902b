"""Scale-out on Ray Serve: replicas of one Hedgerow engine each, behind Serve's proxies.

``hedgerow serve --ray`` (``cli``) deploys the application of ``app``: a deployment of
``replica.HedgerowReplica``, each replica one engine built as ``hedgerow serve`` builds it, with
Serve's gRPC proxy serving ``hedgerow.v1.Generation`` and health (``grpc_services``) and its HTTP
proxy the OpenAI API of ``hedgerow proxy``, run inside each replica over the service in process
(``calls``). Every replica's Prometheus metrics are listed for scraping by ``directory``.

Speculation stays inside a replica: its draft and target models, on the CPU, on one GPU, or on two
(the target on the first). Scaling out means more replicas, each a whole engine.

An edge of the server: the engine core imports nothing from here, and nothing here imports Ray at
module level except where a replica or the command runs (``pip install -e ".[ray]"``).
"""
