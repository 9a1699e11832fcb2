"""The Snapwake scheduler: admin API, placement, leases, autoscaling and leader election."""
