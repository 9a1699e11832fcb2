"""The nodeagent: runs one node's instance containers (runc) and reports them to etcd.

    config.py      NodeAgentConfig (frozen, loaded once in __main__)
    machine.py     the per-instance state machine (pure)
    bundle.py      OCI bundles in the instance sandbox (pure config + writer); seccomp.py its
                   syscall filter; container.py: the built-in model server's or a user image's
                   container (users.py: an image's user)
    spec_checks.py what the node checks in a spec (model dir under model_roots, env keys)
    forward.py     the per-instance host listener into the container's network namespace
    cgroups.py     a container's OOM kills
    containers/    Containers: runc.py (real) beside fake.py (unit tests)
    gpu/           NVML inventory, device nodes and driver files, the CUDA driver checkpoint
    agent.py       node registration, orphan clean-up, reconcile loop
    operations.py  start / restore / suspend / stop flows; api.py the thin gRPC servicer
"""
