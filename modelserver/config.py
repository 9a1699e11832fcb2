"""The model server's configuration (flags as in docs/CONTRACTS.md, or SNAPWAKE_* variables)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["ModelServerConfig"]

MODES = ("load", "snapshot", "standby")


@dataclass(frozen=True)
class ModelServerConfig:
    """python -m modelserver: serve one model with the OpenAI API."""

    model_dir: str = field(default="", metadata={"help": "Hugging Face model directory (tokenizer; weights in load/snapshot)"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP bind address"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    gpu_index: int = field(default=0, metadata={"help": "GPU to use with --device cuda (the node's index, "
                                                        "as the blobstore knows it)"})
    cuda_device: int = field(default=-1, metadata={"help": "CUDA ordinal of that GPU in this process (-1: "
                                                           "--gpu-index; 0 in a sandbox that shows only it)"})
    gpu_memory_bytes: int = field(default=0, metadata={"help": "GPU memory slice; sizes the reserved address range"})
    max_batch: int = field(default=64, metadata={"help": "requests decoded together at most"})
    cuda_graphs: bool = field(default=True, metadata={"help": "replay decode steps as CUDA graphs (cuda only)"})
    standby_trim: bool = field(default=True, metadata={"help": "at release, also shrink the CUDA context's "
                                                       "stack and hand freed host memory back (malloc_trim), "
                                                       "so a standby's checkpoint is small"})
    start_mode: str = field(default="load", metadata={"help": "load, snapshot or standby"})
    control_socket: str = field(default="", metadata={"help": "Unix socket path the model server listens on"})
    handover_socket: str = field(default="", metadata={"help": "the blobstore's handover socket path"})
    snapshot_id: str = field(default="", metadata={"help": "snapshot to attach in standby mode"})
    sample_request: str = field(default="", metadata={"help": "JSON chat request run as warm-up"})
    served_model: str = field(default="", metadata={"help": "id listed in /v1/models (default: the dir name)"})
    dtype: str = field(default="", metadata={"help": "weight dtype override (default: the config's)"})
    chat_template: str = field(default="", metadata={"help": "Jinja chat template replacing the tokenizer's "
                                                               "(default: the tokenizer's own)"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})

    def validate(self) -> list[str]:
        """Every problem, each naming its key."""
        errors = []
        if not self.model_dir:
            errors.append("--model-dir: required")
        if self.device not in ("cpu", "cuda"):
            errors.append(f"--device: expected cpu or cuda, got {self.device!r}")
        if self.start_mode not in MODES:
            errors.append(f"--start-mode: expected one of {', '.join(MODES)}, got {self.start_mode!r}")
        if not 1 <= self.max_batch <= 1024:
            errors.append(f"--max-batch: expected 1..1024, got {self.max_batch}")
        if not 0 <= self.port < 65536:
            errors.append(f"--port: out of range: {self.port}")
        if self.start_mode == "standby" and not (self.snapshot_id and self.handover_socket):
            errors.append("--snapshot-id and --handover-socket: required in standby mode")
        if self.start_mode == "snapshot" and not (self.handover_socket and self.control_socket):
            errors.append("--handover-socket and --control-socket: required in snapshot mode")
        if self.sample_request:
            try:
                if not isinstance(json.loads(self.sample_request), dict):
                    errors.append("--sample-request: must be a JSON object")
            except ValueError as exc:
                errors.append(f"--sample-request: not JSON: {exc}")
        return errors
