"""Environment keys a function's spec may not set: those that change what the dynamic loader,
an interpreter or a shell loads or runs before the program's own code (pure, shared by the
scheduler's spec validation and the nodeagent's start checks).

The built-in model server is our code reading a tenant's model directory: an ``LD_PRELOAD`` or
``PYTHONPATH`` pointing into that directory would make it run the tenant's code instead, with
the model server's access to the blobstore handover socket and the snapshots it stores. For a
user image the same keys are refused too, so one spec means the same thing on every image.
The platform's own variables (``SNAPWAKE_*``, GPU visibility) are refused rather than silently
overridden.
"""

from __future__ import annotations

__all__ = ["FORBIDDEN_EXACT", "FORBIDDEN_PREFIXES", "forbidden_env_key"]

# Whole families, by prefix: what each one steers.
FORBIDDEN_PREFIXES: dict[str, str] = {
    "LD_": "the dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...)",
    "PYTHON": "the Python interpreter (PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, ...)",
    "BASH_FUNC_": "bash functions imported from the environment",
    "DYLD_": "the macOS dynamic loader",
    "PERL5": "the Perl interpreter",
    "RUBY": "the Ruby interpreter",
    "SNAPWAKE_": "the platform's own settings (the nodeagent sets them)",
}

# Single keys.
FORBIDDEN_EXACT: dict[str, str] = {
    "PERLLIB": "the Perl module path",
    "NODE_OPTIONS": "node's command line (--require runs a module first)",
    "NODE_PATH": "node's module path",
    "BASH_ENV": "a file non-interactive bash runs first",
    "ENV": "a file sh runs first",
    "SHELLOPTS": "bash options (xtrace with PS4 runs commands)",
    "PS4": "bash's trace prompt (expanded, so it can run commands)",
    "GLIBC_TUNABLES": "glibc's tunables (CVE-2023-4911 went through it)",
    "GCONV_PATH": "glibc's charset converter modules",
    "LOCPATH": "glibc's locale files",
    "NLSPATH": "message catalogs",
    "HOSTALIASES": "the resolver's alias file",
    "MALLOC_CONF": "jemalloc's options",
    "JAVA_TOOL_OPTIONS": "every JVM's command line (-javaagent)",
    "_JAVA_OPTIONS": "every JVM's command line",
    "JDK_JAVA_OPTIONS": "the java launcher's command line",
    "CLASSPATH": "the JVM's class path",
    "OPENSSL_CONF": "OpenSSL's config (it loads engines)",
    "OPENSSL_ENGINES": "OpenSSL's engine directory",
    "CUDA_VISIBLE_DEVICES": "which GPU the process sees (the nodeagent sets it)",
    "NVIDIA_VISIBLE_DEVICES": "which GPU the process sees (the nodeagent sets it)",
}


def forbidden_env_key(key: str) -> str | None:
    """Why ``key`` may not be set by a spec (what it steers), or None when it may."""
    # Exact case: the loader and the interpreters read these names case-sensitively.
    if key in FORBIDDEN_EXACT:
        return FORBIDDEN_EXACT[key]
    for prefix, what in FORBIDDEN_PREFIXES.items():
        if key.startswith(prefix):
            return what
    return None
