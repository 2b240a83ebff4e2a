"""The HTTP API under ``/api/v1``: one router per module, each endpoint guarded by a scope.

A router module exposes ``router: APIRouter``; its endpoints take a database connection with
``Depends(db)`` and declare their scope with ``dependencies=[Depends(require("read"))]`` (or
``"admin"``). Shared state lives on ``app.state`` (see :class:`ApiState`).
"""
