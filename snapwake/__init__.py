"""Code shared by Snapwake's services, model server and tools."""
