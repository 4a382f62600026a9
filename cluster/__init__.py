"""plumbline on Ray Serve: `plumbline serve --replicas N` (see docs/SCALING.md).

    app       the Serve application: an ingress deployment and N engine replicas
    ingress   reads the body for routing hints, relays ASGI messages, retries 429s, fans out
              weights updates and metrics
    replica   one engine and the gateway's own Starlette app, driven over ASGI
    routing   the policy: hints from a request body, session stickiness, prefix affinity,
              power of two choices; router: the Ray Serve RequestRouter applying it
    metrics   every replica's metrics under a `replica` label

cluster imports gateway and engine; neither imports cluster (tests/test_layout.py).
"""
