"""Child process of :func:`hf_shedder.evaluation.speed.benchmark_pair_in_subprocesses`.

``python -m hf_shedder.evaluation.bench_worker SPEC_JSON``: load one model, prepare the benchmark calls,
then answer one JSON line per request on stdin: ``{"op": "run", "name": N}`` -> ``{"seconds": t}``,
``{"op": "finish"}`` -> ``{"peak": bytes, "kind": ...}``. Anything else the libraries print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _num_layers(model: Any) -> int | None:
    """Decoder layers of ``model`` as its family adapter counts them (None for families without one)."""
    from hf_shedder.arch import get_adapter
    from hf_shedder.errors import ShedderError
    from hf_shedder.modeling import PrunedMambaForCausalLM

    inner = model.model if isinstance(model, PrunedMambaForCausalLM) else model
    try:
        return get_adapter(inner).num_layers()
    except ShedderError:
        return None


def main(argv: list[str]) -> int:
    # the protocol owns stdout; library output (warnings, progress) is sent to stderr
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    import torch

    from hf_shedder.errors import ShedderError
    from hf_shedder.evaluation.speed import _MemoryPeak, _time_once, prepare_measurements
    from hf_shedder.loading import load_model, parse_dtype

    spec = json.loads(argv[0])
    torch.set_num_threads(int(spec["threads"]))
    settings = dict(spec["settings"])
    settings["decode_batch_sizes"] = tuple(settings["decode_batch_sizes"])
    try:
        device = torch.device(spec["device"])
        model = load_model(spec["model"], dtype=parse_dtype(spec["dtype"]), device=spec["device"])
    except ShedderError as e:  # a readable error for the parent; anything else shows its traceback on stderr
        send({"error": str(e)})
        return 2
    memory = _MemoryPeak(device)  # after loading: the peak is what running adds over the loaded model
    calls = prepare_measurements(model, device, **settings)
    send({"names": list(calls), "n_params": sum(p.numel() for p in model.parameters()),
          "num_layers": _num_layers(model), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
          "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            send({"seconds": _time_once(calls[request["name"]], device)})
        elif request["op"] == "finish":
            peak, kind = memory.read()
            send({"peak": peak, "kind": kind})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
