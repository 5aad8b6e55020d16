"""The vLLM side of the ``vllm`` engine: run by vLLM's own interpreter, one per replica.

It imports only the standard library and vLLM (never this project, whose
dependencies that interpreter lacks) and speaks a small framed protocol on
stdin and on a private duplicate of stdout; fd 1 itself is pointed at stderr,
so whatever vLLM or its C++ kernels print cannot corrupt a frame. A frame is
an 8-byte big-endian length and a pickle of plain lists, dicts and
``array.array`` (pickles of numpy arrays are not portable across numpy 1 and 2)::

    parent -> {"op": "init", "llm": {"model": "/path", "dtype": "bfloat16", ...}}
    worker -> {"ok": True, "vocab_size": 151936, "version": "0.32.0"}
    parent -> {"op": "generate", "requests": [{"prompt": [...], "seed": 17}], "sampling": {...}}
    worker -> {"ok": True, "result": [[71, 5, 2], ...]}               # token ids per request
    parent -> {"op": "score", "requests": [{"prompt": [...], "start": 40}], "logprobs": 35}
    worker -> {"ok": True, "result": [(ids, logprobs, ranks, width), ...]}  # per request
    parent -> {"op": "close"}                  (or EOF)
    worker -> {"error": "one line", "kind": "user"}   instead of ok, for any failure

``kind`` says what the failure means, judged here where the exception is (the parent sees only
the line): "user" (no vLLM in this interpreter; vLLM refused the model or the settings: a
missing or unsupported model, an unknown ``vllm_args`` key, a bad value), "resource" (out of
memory, the GPU's or the machine's), "transient" (anything else: vLLM's engine core died, a
request failed; retried by the stage).

The worker exits when its parent dies (a kill -9 of the stage): a watchdog
thread sees the new parent id and kills the worker's process group, which
holds vLLM's engine-core process too (the parent starts it in a new session).
"""

import os
import sys

# This file's directory must not shadow vLLM's imports (engines/vllm.py is not `vllm`).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import pickle  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from array import array  # noqa: E402

HEADER = struct.Struct(">Q")


def read_frame(stream):
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None  # EOF: the parent closed the pipe or died
    (size,) = HEADER.unpack(head)
    return pickle.loads(stream.read(size))


def write_frame(stream, obj):
    data = pickle.dumps(obj, protocol=4)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def one_line(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip()


# How torch and vLLM say that memory ran out: torch.OutOfMemoryError ("CUDA out of memory"), the
# CPU allocator's RuntimeError, vLLM's ValueError when the weights leave no room for the KV cache.
OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "No available memory for the cache blocks",
)


def kind_of(exc, *, loading):
    """What a failure means (see the module's docstring): while loading, vLLM's refusals of the
    model or the settings (OSError, ValueError, TypeError, KeyError) are the user's; during a
    request only memory is told apart."""
    text = str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "resource"
    if any(words in text for words in OUT_OF_MEMORY):
        return "resource"
    if loading and isinstance(exc, (OSError, ValueError, TypeError, KeyError)):
        return "user"
    return "transient"


def watch_parent(parent):
    """Kill this process group once the parent is gone (it was killed, not closed)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            if os.getpgrp() == os.getpid():  # our own group (a new session): take vLLM along
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(1)


def generate(llm, req):
    from vllm import SamplingParams

    common = dict(req["sampling"])
    bias = {int(k): v for k, v in common.pop("logit_bias", {}).items()}
    params = [
        SamplingParams(
            n=1,
            seed=r["seed"],
            ignore_eos=True,  # stop only at the caller's stop tokens, as the hf engine does
            detokenize=False,  # the parent decodes with its own tokenizer
            logit_bias=bias or None,
            **common,
        )
        for r in req["requests"]
    ]
    prompts = [{"prompt_token_ids": r["prompt"]} for r in req["requests"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def score(llm, req):
    """Top ``logprobs`` entries (plus the actual token) of every position from ``start`` on."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=req["logprobs"], detokenize=False
    )
    prompts = [{"prompt_token_ids": r["prompt"]} for r in req["requests"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    width = req["logprobs"] + 1
    result = []
    for r, out in zip(req["requests"], outputs, strict=True):
        ids, lps, ranks = array("i"), array("f"), array("i")
        for entry in out.prompt_logprobs[r["start"] :]:
            items = sorted(entry.items(), key=lambda kv: kv[1].rank)[:width]
            pad = width - len(items)
            ids.extend([i for i, _ in items] + [-1] * pad)
            lps.extend([lp.logprob for _, lp in items] + [0.0] * pad)
            ranks.extend([lp.rank for _, lp in items] + [0] * pad)
        result.append((ids, lps, ranks, width))
    return result


def main():
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # vLLM's prints and logs go to stderr, never into a frame
    proto_in = sys.stdin.buffer
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    init = read_frame(proto_in)
    if init is None:
        return 0
    try:
        import vllm
    except Exception as exc:  # boundary: reported to the parent (a broken install raises anything)
        said = f"cannot import vllm in {sys.executable} ({one_line(exc)})"
        write_frame(proto_out, {"error": said, "kind": "user"})
        return 1
    try:
        llm = vllm.LLM(**init["llm"])
        vocab = llm.llm_engine.model_config.get_vocab_size()
    except Exception as exc:  # boundary: reported to the parent, with its kind
        said = f"vLLM could not load the model ({one_line(exc)})"
        write_frame(proto_out, {"error": said, "kind": kind_of(exc, loading=True)})
        return 1
    write_frame(proto_out, {"ok": True, "vocab_size": vocab, "version": vllm.__version__})
    handlers = {"generate": generate, "score": score}
    while True:
        req = read_frame(proto_in)
        if req is None or req.get("op") == "close":
            return 0
        try:
            reply = {"ok": True, "result": handlers[req["op"]](llm, req)}
        except Exception as exc:  # boundary: reported to the parent, with its kind
            reply = {"error": one_line(exc), "kind": kind_of(exc, loading=False)}
        write_frame(proto_out, reply)


if __name__ == "__main__":
    sys.exit(main())
