"""Scale-out: the cache-aware routing policy (``policy.py``, pure) for replicas behind an ingress."""
