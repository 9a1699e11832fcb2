"""The Snapwake scheduler: admin API, placement, claims, autoscaling and leader election."""
