"""The nodeagent: runs one node's instance containers (runc) and reports them to etcd.

    config.py     NodeAgentConfig (frozen, loaded once in __main__)
    machine.py    the per-instance state machine (pure)
    bundle.py     OCI bundles (pure config + writer); container.py: an instance's container
    containers/   Containers: runc.py (real) beside fake.py (unit tests)
    gpu/          NVML inventory and the CUDA driver checkpoint
    agent.py      node registration, orphan clean-up, reconcile loop
    operations.py start / restore / suspend / stop flows; api.py the thin gRPC servicer
"""
