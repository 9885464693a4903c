"""Scale-out on Ray: engine replicas as actors behind one `EngineClient`, a KV-aware router, prefill/decode
hand-off, failover and a planner. Ray is imported only when a cluster starts."""
