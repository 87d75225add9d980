"""Response body of ``GET /api/duplicates``: a page of the duplicate groups of the served index generation
(``indexer.duplicates``, re-exported by ``indexer.store.reader``: what a group, a member and their kinds are)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PAGE_SIZE = 1000  # groups per page
DEFAULT_PAGE_SIZE = 50
Kind = Literal["exact", "near"]


class DuplicateMember(BaseModel):
    """One image of a group."""

    id: int = Field(description="image id (/api/images/{id}, its file and thumbnail)")
    path: str = Field(description="path relative to the image folder, POSIX form")
    similarity: float = Field(description="cosine similarity to the group's first member (1 for the first)")
    kind: Kind = Field(description='"exact": another member of the group has the same bytes; "near": none has')


class DuplicateGroup(BaseModel):
    """Images that are copies of each other: pairs at or above the threshold, joined transitively, and files with
    the same bytes."""

    kind: Kind = Field(description='"exact" when every member has the same bytes, else "near"')
    members: list[DuplicateMember] = Field(
        description="the smallest id first, then the others by similarity to it, highest first"
    )


class DuplicatesPage(BaseModel):
    """One page of the groups, larger groups first (then by first id); the order holds within one generation."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "groups": [
                    {
                        "kind": "near",
                        "members": [
                            {"id": 7, "path": "2024/IMG_0042.jpg", "similarity": 1.0, "kind": "near"},
                            {"id": 95, "path": "shared/IMG_0042.jpg", "similarity": 0.9987, "kind": "near"},
                        ],
                    }
                ],
                "total_groups": 1,
                "images": 1200,
                "threshold": 0.995,
                "folder": None,
                "generation": "g-000003",
                "next_cursor": None,
                "took_ms": 3.1,
            }
        }
    )

    groups: list[DuplicateGroup]
    total_groups: int = Field(description="groups over every page")
    images: int = Field(description="images compared (those under the folder, if one was given)")
    threshold: float = Field(description="the cosine similarity from which two images are near-duplicates")
    folder: str | None = Field(description="the folder compared, relative to the image folder; null: all images")
    generation: str = Field(description="the index generation the groups are of")
    next_cursor: str | None = Field(description="pass as `cursor` to get the next page; null on the last page")
    took_ms: float
