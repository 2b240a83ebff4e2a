"""Response rows rendered as JSON text by PostgreSQL, each the JSON value its pydantic model
would give (same fields in the same order, same values, same types), so a hot listing's
Python neither parses a row nor encodes one: it joins the lines the database wrote.

Each field is rendered by its model annotation: strings by ``to_json`` (JSON's escapes), ints
and booleans as their text, dates as ISO dates, datetimes as pydantic writes them (see
:func:`iso_time`), floats with a ``.0`` where PostgreSQL writes an integral value bare and
``null`` where pydantic's ``inf_nan_mode="null"`` would write it, and jsonb as stored (the
numbers as the device wrote them: ``1.10`` stays ``1.10``; the same value when parsed).
A concatenation, not ``row_to_json``: that looks each column's output function up per row and
took twice the time of the plain fetch on a rollup of 2,200 rows.
"""

from __future__ import annotations

import json
import typing
from datetime import date, datetime
from typing import Any, cast

import psycopg
from psycopg import sql
from pydantic import BaseModel


def iso_time(expr: sql.Composable) -> sql.Composed:
    """``expr`` (timestamptz) as the text pydantic writes for it in UTC: ISO 8601, microseconds
    only when not zero (all six digits), ``Z``. The API's sessions run in UTC (``deps.make_pool``),
    so this is the datetime psycopg reads there; written at UTC whatever the session's zone, so a
    connection set otherwise cannot change an answer. One ``to_char`` and one ``replace``:
    ``.000000Z`` can only be the fraction (a sub-select computing it once costs a SubPlan per
    row, three times this; a ``CASE`` on the microseconds costs more than the ``replace``)."""
    return sql.SQL(
        "replace(to_char(({}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
        " '.000000Z', 'Z')"
    ).format(expr)


def value_sql(expr: sql.Composable, annotation: Any) -> sql.Composed:
    """The JSON text of ``expr`` for a field annotated ``annotation``: ``null`` for NULL where
    the annotation allows None; a required field's NULL makes the whole row NULL, which
    :func:`lines` refuses (as the model would refuse the row), so a NOT NULL column costs no
    ``coalesce`` per row (~0.3 ms of a 1000-row page)."""
    args = set(typing.get_args(annotation) or (annotation,))
    kinds = args - {type(None)}
    nullable = type(None) in args
    if typing.get_origin(annotation) is dict:
        kinds = {dict}
    if kinds in ({str}, {date}):
        text = sql.SQL("to_json({})::text").format(expr)  # JSON's escapes; ISO dates
    elif kinds in ({int}, {bool}, {dict}):
        text = sql.SQL("{}::text").format(expr)  # jsonb: as stored
    elif kinds == {datetime}:
        text = sql.SQL("'\"' || {} || '\"'").format(iso_time(expr))
    elif kinds == {float}:
        # float8's shortest round-trip text (a numeric column is the float psycopg's Decimal
        # becomes in the model); pydantic writes 3.0 where that writes 3, and null for NaN and
        # the infinities (no sub-select: that costs a SubPlan per row)
        text = sql.SQL(
            "CASE WHEN {x} IN ('NaN', 'Infinity', '-Infinity') THEN 'null'"
            " WHEN {x} = trunc({x}) AND strpos({x}::text, 'e') = 0 THEN {x}::text || '.0'"
            " ELSE {x}::text END"
        ).format(x=sql.SQL("({})::float8").format(expr))
    else:
        raise TypeError(f"no SQL rendering for a field of type {annotation!r}")
    return sql.SQL("coalesce({}, 'null')").format(text) if nullable else sql.Composed([text])


def object_sql(model: type[BaseModel], exprs: dict[str, sql.Composable] | None = None) -> sql.SQL:
    """One row of ``model`` as JSON text: its fields in order, each read from the column of
    its name or from ``exprs[name]``."""
    exprs = exprs or {}
    parts: list[sql.Composable] = []
    for i, (name, field) in enumerate(model.model_fields.items()):
        key = ("{" if i == 0 else ",") + json.dumps(name) + ":"
        parts += [
            sql.Literal(key),
            value_sql(exprs.get(name, sql.Identifier(name)), field.annotation),
        ]
    parts.append(sql.Literal("}"))
    # composed once into plain SQL text: a request then splices one string, not ~150 parts
    # (44 us a request on this box)
    text = sql.SQL("({})").format(sql.SQL(" || ").join(parts)).as_string(None)
    if "%" in text:  # would be read as a parameter once spliced into a query as plain SQL
        raise TypeError(f"{model.__name__}: a field name or literal holds '%'")
    return sql.SQL(text)


def renders(model: type[BaseModel]) -> bool:
    """Whether :func:`object_sql` can render every field of ``model``."""
    try:
        object_sql(model)
    except TypeError:
        return False
    return True


def lines(cur: psycopg.Cursor[Any], limit: int) -> tuple[list[bytes], int]:
    """The first column of the first ``limit`` rows of ``cur``'s result, as the bytes
    PostgreSQL sent (no decoding, no row tuples), and how many rows there were.

    A NULL line is a row whose required field was NULL: refused (:class:`RenderError`), as the
    model would have refused it, rather than left out of the answer."""
    result = cur.pgresult
    assert result is not None
    n = result.ntuples
    values = [result.get_value(i, 0) for i in range(min(n, limit))]
    if None in values:
        raise RenderError(f"row {values.index(None)} of the answer has NULL in a required field")
    return cast(list[bytes], values), n


def wrapped(head: bytes, items: list[bytes], tail: bytes) -> bytes:
    """``head``, ``items`` joined by commas, then ``tail``: one copy of the items' bytes (a
    1000-event page is ~340 KB; each further copy cost ~0.1 ms here). ``items`` is spent."""
    if not items:
        return head + tail
    items[0] = head + items[0]
    items[-1] += tail
    return b",".join(items)


class RenderError(RuntimeError):
    """A row could not be rendered as its model's JSON (a required field was NULL)."""
