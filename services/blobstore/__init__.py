"""The blobstore: striped snapshot storage, a host-memory cache tier and the device handover.

    store/      StripedStore (disk, N directories) beside MemoryStore (tests)
    cache.py    byte budget + LRU of whole snapshots over one arena allocated (and pinned) once
    device.py   exportable memory: MemfdLoader (CPU hosts) and CudaLoader (cuMemCreate + fd)
    core.py     Blobstore: the synchronous logic shared by gRPC and the handover socket
    peers.py    fetching a snapshot from a peer blobstore over gRPC
    handover/   the Unix-socket servers of snapwake.protocols: the node socket and one per instance
    api.py      the thin gRPC servicer; app.py wires a configured blobstore together
    config.py   BlobstoreConfig (frozen, loaded once in __main__)
    ids.py      snapshot ids: validation and safe directory names (pure)
    manifest.py manifest JSON, digest, chunk geometry and checksums (pure)
    metrics.py  cache occupancy and hit rate, DMA bytes and time
    testing.py  a real blobstore in-process and a put client, for tests
"""
