"""The in-container model server: loads a model into one contiguous arena, serves the OpenAI
API over HTTP, and releases / re-attaches its weights on the nodeagent's control socket.

    runtime.demo        a tiny seeded Llama in the Hugging Face layout (tests, dev, bench)
    runtime.manifest    arena layout and the blobstore manifest (pure)
    runtime.arena       arena backends: memfd (CPU) and cuda (cuMem* VMM)
    runtime.model       HF model dir -> meta skeleton -> weights bound as arena views
    runtime.engine      continuous batching: admission, prefill, decode, sampling, stop strings
    runtime.kvcache     the paged KV pool and its attention
    runtime.openai      the OpenAI-compatible HTTP app
    runtime.control     the control socket server; runtime.handover the blobstore client
    runtime.instance    the phase machine tying them together

Run it with ``python -m runtime --help``.
"""
