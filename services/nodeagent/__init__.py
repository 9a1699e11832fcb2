"""The nodeagent: runs one node's instance containers (runc) and reports them to etcd.

    config.py        NodeAgentConfig (frozen, loaded once in __main__); server.py assembles the agent
    machine.py       the per-instance state machine (pure)
    admission.py     bounded restores and checkpoints on the node (the driver gate)
    bundle.py        OCI bundles in the instance sandbox (pure config + writer); seccomp.py its
                     syscall filter; container.py: the built-in model server's or a user image's
                     container (users.py: an image's user)
    spec_checks.py   what the node checks in a spec (model dir under model_roots, env keys)
    forward.py       the per-instance host listener into the container's network namespace
    cgroups.py       a container's OOM kills
    containers/      Containers: runc.py (real) beside fake.py (unit tests)
    gpu/             NVML inventory, device nodes and driver files, the CUDA driver checkpoint
    images/          the node's digest-keyed image cache (pull, unpack, acquire/release, evict)
    userimage.py     starting a user image: pull, sandboxed container, readiness, warm-up
    handover.py      each instance's own blobstore handover socket
    agent.py         node registration under an etcd lease, orphan clean-up, reconcile loop
    operations.py    start / restore / suspend / stop flows; api.py the thin gRPC servicer
    process_mode.py  PROCESS snapshots: the driver checkpoints the whole container process
    coldstandby.py   the cold-standby tier: long-parked standbys paged out to swap (MADV_PAGEOUT)
    probe.py         one container's model server: HTTP health, control socket, /proc
    logs.py          output.log: the container's output through a size-capped relay (rotated),
                     written and read without following symlinks
    integrity.py     snapshot pre-warm before a standby attaches; marking corrupt copies
    modelinfo.py     model metadata (context, vocabulary, chat template) read at start
    tracing.py       spans around awaitables
"""
