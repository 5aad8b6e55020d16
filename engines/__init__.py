"""Engines: generate and score with a model, in this process (hf), a vLLM subprocess (vllm) or
an OpenAI-compatible server (openai), behind one interface (``engines.base``).

They load models and tokenizers through train/ (``train.models``); they know no stage, flow or
world.

May import: data/, train/.
"""
