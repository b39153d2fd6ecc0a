"""`prefix-serve --replicas N`: the same HTTP API over N engine replicas on Ray Serve.

The only package that imports Ray. Shaped like Ray Serve's own LLM apps: an ingress deployment
runs the FastAPI app (`ingress.py`), an engine deployment holds one model and one `Engine` per
replica (`replica.py`), and the ingress streams from it through a `DeploymentHandle` whose
multiplexed model id is the resolved prefix (`client.py`). See docs/scaling.md.
"""
