"""``/api/v1/tokens``: administrators list, create and revoke API tokens.

A district admin manages every token; a school admin only tokens limited to (a subset of) its
own schools, and creates only ``school_admin`` or ``reader`` tokens for them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import psycopg
from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field, model_validator

from ingest_server.web.api import access, auth
from ingest_server.web.api.deps import db
from schemas.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], dependencies=[access.GUARD])
Conn = Annotated[psycopg.Connection[Any], Depends(db)]
SchoolId = Annotated[str, Field(pattern=ID_PATTERN)]


class TokenRequest(BaseModel):
    name: str = Field(
        min_length=1, max_length=128, pattern=r"\S", description="who or what uses it"
    )
    role: auth.Role | None = Field(
        default=None, description="district_admin, school_admin, reader or service"
    )
    schools: list[SchoolId] | None = Field(
        default=None,
        min_length=1,
        max_length=auth.MAX_SCHOOLS,
        description="the schools a school_admin (required) or reader (optional) is limited to",
    )
    scopes: list[Literal["read", "admin"]] | None = Field(
        default=None,
        min_length=1,
        description="deprecated: read means role reader, admin role district_admin",
    )

    @model_validator(mode="after")
    def _one_role(self) -> TokenRequest:
        if (self.role is None) == (self.scopes is None):
            raise ValueError("give either role (and schools) or the old scopes, not both")
        return self

    def wanted_role(self) -> auth.Role:
        return self.role if self.role is not None else auth.role_of_scopes(self.scopes or [])


class CreatedToken(BaseModel):
    id: int
    name: str
    role: auth.Role
    schools: list[str] | None
    scopes: list[str] = Field(description="deprecated: admin for district_admin, else read")
    token: str = Field(description="shown only now; only its SHA-256 is stored")


@router.get("")
def list_tokens(conn: Conn, principal: access.Caller) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(t) for t in auth.list_tokens(conn, principal)]


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenRequest, conn: Conn, principal: access.Caller) -> CreatedToken:
    role = body.wanted_role()
    try:
        schools = auth.check_grant(role, body.schools)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    if (why := principal.may_grant(role, schools)) is not None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, why)
    token_id, token = auth.create_token(conn, body.name, role, schools)
    return CreatedToken(
        id=token_id,
        name=body.name,
        role=role,
        schools=None if schools is None else sorted(schools),
        scopes=auth.legacy_scopes(role),
        token=token,
    )


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: int, conn: Conn, principal: access.Caller) -> None:
    if not auth.revoke_token(conn, token_id, principal):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no active token with id {token_id}")
