"""The nodeagent: runs one node's instance containers (runc) and reports them to etcd.

    config.py        NodeAgentConfig (frozen, loaded once in __main__); server.py assembles the agent
    machine.py       the per-instance state machine (pure)
    admission.py     bounded restores and checkpoints on the node (the driver gate)
    bundle.py        OCI bundles (pure config + writer); container.py: an instance's container
    containers/      Containers: runc.py (real) beside fake.py (unit tests)
    gpu/             NVML inventory and the CUDA driver checkpoint
    agent.py         node registration under an etcd lease, orphan clean-up, reconcile loop
    operations.py    start / restore / suspend / stop flows; api.py the thin gRPC servicer
    process_mode.py  PROCESS snapshots: the driver checkpoints the whole container process
    probe.py         one container's model server: HTTP health, control socket, /proc, log
    integrity.py     snapshot pre-warm before a standby attaches; marking corrupt copies
    modelinfo.py     model metadata (context, vocabulary, chat template) read at start
    tracing.py       spans around awaitables
"""
