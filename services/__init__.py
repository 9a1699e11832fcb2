"""Snapwake services: gateway, scheduler, nodeagent, blobstore."""
