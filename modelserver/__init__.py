"""The in-container model server: loads a model into one contiguous arena, serves the OpenAI
API over HTTP, and releases / re-attaches its weights on the nodeagent's control socket.

    modelserver.demo        a tiny seeded Llama in the Hugging Face layout (tests, dev, bench)
    modelserver.manifest    arena layout and the blobstore manifest (pure)
    modelserver.arena       arena backends: memfd (CPU) and cuda (cuMem* VMM)
    modelserver.model       HF model dir -> meta skeleton -> weights bound as arena views
    modelserver.engine      continuous batching: admission, prefill, decode, sampling, stop strings
    modelserver.graphs      decode steps as CUDA graphs per (batch, block-table width) bucket
    modelserver.kvcache     the paged KV pool and its attention
    modelserver.openai      the OpenAI-compatible HTTP app
    modelserver.control     the control socket server; modelserver.handover the blobstore client
    modelserver.instance    the phase machine tying them together
    modelserver.budget      the GPU memory slice turned into limits (pure)
    modelserver.sampling    sampling parameters; modelserver.stops stop strings (pure)
    modelserver.config      ModelServerConfig, loaded by snapwake.service.bootstrap

Run it with ``python -m modelserver --help``.
"""
