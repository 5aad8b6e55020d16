"""Flows: the campaign, bench and bootstrap, the run config and the mpd CLI.

Importing any of them registers every stage and its tables first (``tasks/registry.py``).
Only flows/ and tasks/ import Prefect.

May import: tasks/, data/, train/, engines/, world/.
"""

import tasks.registry  # noqa: F401
