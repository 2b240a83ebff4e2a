"""``/api/v1/tokens``: admins list, create and revoke API tokens."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import psycopg
from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field

from ingest_server.web.api import auth
from ingest_server.web.api.deps import db

router = APIRouter(
    prefix="/api/v1/tokens", tags=["tokens"], dependencies=[Depends(auth.require("admin"))]
)
Conn = Annotated[psycopg.Connection[Any], Depends(db)]


class TokenRequest(BaseModel):
    name: str = Field(
        min_length=1, max_length=128, pattern=r"\S", description="who or what uses it"
    )
    scopes: list[Literal["read", "admin"]] = Field(min_length=1)


class CreatedToken(BaseModel):
    id: int
    name: str
    scopes: list[str]
    token: str = Field(description="shown only now; only its SHA-256 is stored")


@router.get("")
def list_tokens(conn: Conn) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(t) for t in auth.list_tokens(conn)]


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenRequest, conn: Conn) -> CreatedToken:
    token_id, token = auth.create_token(conn, body.name, list(body.scopes))
    return CreatedToken(id=token_id, name=body.name, scopes=sorted(set(body.scopes)), token=token)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: int, conn: Conn) -> None:
    if not auth.revoke_token(conn, token_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no active token with id {token_id}")
