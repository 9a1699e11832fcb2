"""Baseline (a): what users have today. A fresh process loads a safetensors model directory onto
the GPU with transformers and answers one request. Prints one JSON line of timings.

    python -m bench.baseline MODEL_DIR
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.time()


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.time() - T0
    model_dir = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    t_load = time.time() - T0
    ids = tok("Hello, how are you today?", return_tensors="pt").input_ids.to("cuda")
    with torch.no_grad():
        out = model(input_ids=ids)
        first = int(out.logits[0, -1].argmax())
    torch.cuda.synchronize()
    print(json.dumps({"import_s": t_import, "load_s": t_load, "first_token_s": time.time() - T0,
                      "first_token": first, "start_unix": T0}), flush=True)


if __name__ == "__main__":
    main()
