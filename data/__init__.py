"""Data: the plain library under everything: schemas and tables, the stage store and object
store, keys and digests, the DuckDB catalog and its SQL, problem sources and graders, errors.

It knows no models and no orchestrator, so a test (or ``mpd sql``) uses it alone.

May import: no other package of ours.
"""
