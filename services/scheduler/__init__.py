"""The Snapwake scheduler: admin API, placement, claims, autoscaling and leader election.

    config.py        SchedulerConfig (frozen, loaded once in __main__); app.py wires the parts
    spec.py          FunctionSpec validation and defaults (pure)
    state.py         the etcd view: functions, nodes, instances, snapshots (ClusterState)
    policy/          placement plugins: one Filter or Score per file, and eviction (pure)
    claimtable.py    claim accounting: who holds a slot of which instance, until when (pure)
    claims.py        ClaimBroker: AcquireClaim's decisions, waits and shared starts
    starter.py       bringing up one instance: restore a standby, else start one
    snapshots.py     building a revision's snapshot, with bounded retries
    controller.py    the leader's reconcile loop: standbys, min/max instances, scale in, clean-up
    election.py      leader election through an etcd lease
    nodes_base.py    the Nodes interface; nodes.py its gRPC client, nodes_fake.py the fake
    api.py           the thin gRPC servicers: SchedulerService (admin) and ClaimService
    access.py        admin bearer tokens and tenant scoping (Caller, Authenticator)
    quota.py         per-tenant quotas: limits, use, checks (pure)
    audit.py         the admin audit log (JSON lines, size-capped rotation)
    bootstrap.py     python -m services.scheduler.bootstrap: an operator token and the API-key secret in files
    metrics.py       Prometheus series from the etcd mirror
"""
