"""Train: the losses, the one trainer, its examples and batches, checkpoints, model loading.

A plain library over torch: no orchestrator (tasks/ wraps it as a stage), no engine and no
world (world/ trains through it like any user's code).

May import: data/.
"""
