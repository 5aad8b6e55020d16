"""Tasks: one module per stage (its whole declaration, key wiring and body), the stage
machinery (context, keys, shards, Prefect wrapping) and the registry of every stage.

A stage wraps plain functions of the libraries and is composed by flows/, which it never
imports.

May import: data/, train/, engines/, world/.
"""
