"""Code shared by Snapwake's services, runtime and tools."""
