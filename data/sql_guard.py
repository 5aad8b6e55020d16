"""The guard in front of every SQL text a user supplies (``mpd sql``, ``filter.sql``): exactly
one query in, or a clear refusal.

It is one of two lines. The boundary for *reads* is DuckDB's own sandbox
(:mod:`data.sandbox`: the connection can read the workspace's committed files and nothing
else, configuration locked), never a list of function names. But DuckDB lets a sandboxed
connection *write* the files it may read (``COPY ... TO`` an allowed file), so the query text
itself is checked, with DuckDB's own parser (never with regexes over SQL), before it runs:

1. ``duckdb.extract_statements`` splits the query: exactly one statement, of a
   SELECT type (plain SELECT, FROM-first, WITH ... SELECT, VALUES, DESCRIBE, SHOW,
   SUMMARIZE, PIVOT with an IN list, UNPIVOT), or EXPLAIN [ANALYZE] of one of those.
   Every other type is refused by name.
2. A statement that DuckDB calls SELECT can still write: DuckDB 2.0 accepts
   data-modifying CTEs, so ``WITH x AS (COPY t TO 'f.csv') SELECT 1`` is a
   "SELECT" that writes ``f.csv`` (INSERT/UPDATE/DELETE work the same way). And
   some table/scalar functions change state (``checkpoint()``,
   ``truncate_duckdb_logs()``) or run SQL built at run time (``query(...)``).
   So the SELECT is also serialised to its syntax tree with
   ``json_serialize_sql`` and walked: every query node must be a SELECT/set
   operation/recursive CTE node, and no function may be in
   :data:`DENIED_FUNCTIONS`. Anything the serialiser cannot handle is refused
   (fail closed).

Example::

    >>> check_read_only("SELECT round, accuracy FROM round_summary")  # passes
    >>> check_read_only("COPY evals TO 'e.csv'")
    Traceback (most recent call last):
    ReadOnlyError: refused: COPY writes files or tables; mpd sql is read-only (use --out FILE.parquet to save a result)
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import duckdb

from data.errors import UserError

READ_ONLY = "mpd sql is read-only"
SAVE_HINT = "use --out FILE.parquet to save a result"


class SqlError(UserError):
    """The query cannot run: empty, a syntax error, or an error DuckDB raised while running it."""


class ReadOnlyError(SqlError):
    """The query would change something (a file, a setting, the catalog): refused before running."""


# Statement kind (leading keywords, upper case) -> why it is refused. The kind is
# what the user typed, so the message names the statement they recognise.
REFUSED_KINDS: dict[str, str] = {
    "COPY FROM DATABASE": "copies a whole database",
    "COPY": "writes files or tables",
    "EXPORT DATABASE": "writes files",
    "EXPORT": "writes files",
    "IMPORT DATABASE": "creates tables from files",
    "IMPORT": "creates tables from files",
    "ATTACH": "opens or creates a database file",
    "DETACH": "changes the attached databases",
    "USE": "changes the default database",
    "INSTALL": "downloads extensions",
    "FORCE INSTALL": "downloads extensions",
    "LOAD": "loads extensions",
    "UPDATE EXTENSIONS": "downloads extensions",
    "SET": "changes a setting or variable",
    "RESET": "changes a setting or variable",
    "PRAGMA": "can change settings",
    "CREATE": "changes the catalog",
    "INSERT": "writes rows",
    "UPDATE": "writes rows",
    "DELETE": "deletes rows",
    "TRUNCATE": "deletes rows",
    "MERGE": "writes rows",
    "DROP": "changes the catalog",
    "ALTER": "changes the catalog",
    "COMMENT": "changes the catalog",
    "CALL": "runs a procedure that can change state",
    "CHECKPOINT": "writes the database file",
    "FORCE CHECKPOINT": "writes the database file",
    "BEGIN": "controls transactions",
    "START": "controls transactions",
    "COMMIT": "controls transactions",
    "END": "controls transactions",
    "ROLLBACK": "controls transactions",
    "ABORT": "controls transactions",
    "VACUUM": "rewrites storage",
    "ANALYZE": "updates statistics",
    "PREPARE": "defines a statement to run later",
    "EXECUTE": "runs a prepared statement",
    "DEALLOCATE": "changes prepared statements",
    "PIVOT": "without an IN list creates a type first (write PIVOT ... ON col IN (...))",
}

# StatementType name -> kind, for statements whose text starts with a keyword
# not in REFUSED_KINDS (e.g. ``WITH x AS (...) INSERT INTO ...``).
_TYPE_KINDS: dict[str, str] = {
    "COPY_DATABASE": "COPY FROM DATABASE",
    "EXPORT": "EXPORT DATABASE",
    "MERGE_INTO": "MERGE",
    "TRANSACTION": "BEGIN",
    "VARIABLE_SET": "SET",
    "CREATE_FUNC": "CREATE",
    "EXTENSION": "INSTALL",
    "MULTI": "PIVOT",
}

# Functions a SELECT may not call: they change state, run SQL chosen at run time
# (which this guard cannot see), or scan raw memory pointers.
DENIED_FUNCTIONS: dict[str, str] = {
    "checkpoint": "writes the database file",
    "force_checkpoint": "writes the database file",
    "enable_logging": "changes a setting",
    "disable_logging": "changes a setting",
    "enable_profiling": "changes a setting",
    "disable_profiling": "changes a setting",
    "truncate_duckdb_logs": "deletes DuckDB's logs",
    "write_log": "writes to DuckDB's log",
    "query": "runs SQL built at run time, which cannot be checked",
    "json_execute_serialized_sql": "runs SQL built at run time, which cannot be checked",
    "register_external_resource": "changes the catalog",
    "register_external_resource_type": "changes the catalog",
    "create_external_resource": "changes the catalog",
    "deregister_external_resource": "changes the catalog",
    "destroy_external_resource": "changes the catalog",
    "arrow_scan": "reads raw memory",
    "arrow_scan_dumb": "reads raw memory",
    "python_arrow_scan": "reads raw memory",
    "pandas_scan": "reads raw memory",
    "python_map_function": "runs Python",
}

# Query nodes allowed anywhere in a SELECT's syntax tree. DML nodes
# (INSERT_QUERY_NODE, COPY_QUERY_NODE, ...) appear inside data-modifying CTEs.
_ALLOWED_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})

_LEADING_WORDS = re.compile(r"[A-Za-z_]+")
_EXPLAIN_PREFIX = re.compile(
    r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^()]*\)\s*)?(?=\S)", re.IGNORECASE | re.DOTALL
)


def check_read_only(query: str, *, who: str = "mpd sql") -> str:
    """Return the one statement of ``query`` if it only reads; else raise :class:`ReadOnlyError`
    or :class:`SqlError` naming ``who`` (``mpd sql``, ``filter.sql``) in the message.

    Exactly one statement (a trailing ``;`` is fine): a second one is where injected text
    would hide, and a user's query needs only one. Nothing is executed: parsing and
    serialising the syntax tree happen on a private in-memory connection.
    """
    statements = _parse(query, who)
    if not statements:
        example = EXAMPLE if who == "mpd sql" else "data/sql/filter.sql"
        raise SqlError(f"{who}: empty query, nothing to run (write one SELECT, e.g. {example})")
    if len(statements) > 1:
        raise ReadOnlyError(
            f"refused: {len(statements)} statements; {who} runs exactly one query "
            "(remove all but one, and any ';' inside it)"
        )
    _check_statement(statements[0], who)
    return statements[0].query


EXAMPLE = "SELECT * FROM round_summary"


def _parse(query: str, who: str = "mpd sql") -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        prefix = "" if who == "mpd sql" else f"{who}: "
        raise SqlError(prefix + one_line(exc)) from None


def _check_statement(statement: duckdb.Statement, who: str) -> None:
    text = statement.query
    try:
        type_name = statement.type.name
    except ValueError:  # a statement type newer than the Python enum knows
        type_name = "UNKNOWN"
    if type_name == "SELECT":
        _check_tree(text, who)
        return
    if type_name == "EXPLAIN":
        _check_explain(text, who)
        return
    _refuse(_kind_of(text, type_name), who)


def _refuse(kind: str, who: str, where: str = "") -> NoReturn:
    reason = REFUSED_KINDS.get(kind, "is not a read-only statement")
    if who == "mpd sql":
        hint = f" ({SAVE_HINT})" if kind in ("COPY", "EXPORT", "EXPORT DATABASE") else ""
        raise ReadOnlyError(f"refused: {kind}{where} {reason}; {READ_ONLY}{hint}")
    raise ReadOnlyError(
        f"refused: {kind}{where} {reason}; {who} must be one SELECT whose rows mpd writes"
    )


def _kind_of(text: str, type_name: str) -> str:
    """The statement's leading keyword(s) as typed, e.g. ``COPY FROM DATABASE``."""
    words = [w.upper() for w in _LEADING_WORDS.findall(text[:200])[:3]]
    for n in (3, 2, 1):
        kind = " ".join(words[:n])
        if len(words) >= n and kind in REFUSED_KINDS:
            return kind
    return _TYPE_KINDS.get(type_name, type_name.replace("_", " "))


def _check_explain(text: str, who: str) -> None:
    """EXPLAIN [ANALYZE] runs (ANALYZE) or plans its statement: check that statement."""
    unclear = ReadOnlyError(f"refused: EXPLAIN of this form cannot be checked; {who} is read-only")
    match = _EXPLAIN_PREFIX.match(text)
    if match is None:
        raise unclear
    try:  # e.g. a comment between EXPLAIN and ANALYZE leaves "ANALYZE ..." behind
        inner = _parse(text[match.end() :])
    except SqlError:
        raise unclear from None
    if len(inner) != 1:
        raise unclear
    _check_statement(inner[0], who)


def _check_tree(text: str, who: str) -> None:
    """Walk a SELECT's syntax tree for data-modifying CTEs and denied functions."""
    con = duckdb.connect(":memory:")
    try:
        (serialized,) = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone() or ("",)
    except duckdb.Error as exc:
        raise SqlError(f"{who}: {one_line(exc)}") from None
    finally:
        con.close()
    try:
        tree = json.loads(serialized) if serialized else {"error": True}
    except RecursionError:  # Python's json parser recurses once per nesting level
        raise SqlError(
            f"{who}: the query nests deeper than can be checked (hundreds of levels of "
            "subqueries or parentheses); flatten it, e.g. with WITH clauses"
        ) from None
    if tree.get("error"):
        message = tree.get("error_message", "it cannot be serialised")
        raise ReadOnlyError(
            f"refused: this SELECT cannot be checked ({message}); {who} is read-only"
        )
    for node in _dicts(tree):
        node_type = node.get("type")
        if (
            isinstance(node_type, str)
            and node_type.endswith("_NODE")
            and node_type not in _ALLOWED_NODES
        ):
            kind = node_type.removesuffix("_NODE").removesuffix("_QUERY").replace("_", " ")
            _refuse(kind, who, " inside WITH")
        name = node.get("function_name")
        if isinstance(name, str) and name.lower() in DENIED_FUNCTIONS:
            reason = DENIED_FUNCTIONS[name.lower()]
            raise ReadOnlyError(f"refused: function {name.lower()}() {reason}; {who} is read-only")


def _dicts(value: Any) -> list[dict[str, Any]]:
    """Every dict inside a parsed JSON value, iteratively (trees can be deep)."""
    found: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def one_line(exc: BaseException) -> str:
    """A DuckDB error as one line: its first line, plus a "Did you mean"/"Candidate" hint.

    e.g. 'Parser Error: syntax error at or near "FORM"'. DuckDB adds a caret
    diagram under parser errors and puts binder hints on a later line.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    hint = next((line for line in lines[1:] if line.startswith(("Candidate", "Did you"))), "")
    # DuckDB's advice to raise a limit with SET: the sandbox's settings are locked.
    first = _SET_ADVICE.sub("; the limit is fixed here: simplify the query", lines[0])
    return f"{first} {hint}".strip()


_SET_ADVICE = re.compile(r"\.?\s*Use \"?SET [^\"]*\"? to [^.]*\.?", re.IGNORECASE)
