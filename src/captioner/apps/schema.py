"""What the HTTP API's requests and answers look like, for its OpenAPI schema (/api/openapi.json, /docs).

The routes return plain dicts built by `CaptionResult.to_dict` (the one serialisation); these models only
describe them, so the schema a client reads and the JSON it gets come from the same field list.
"""
from __future__ import annotations

from pydantic import BaseModel, Field


class Concept(BaseModel):
    word: str
    p: float = Field(description="how evident the object is in the photo (0-1)")


class Alternative(BaseModel):
    caption: str
    score: float


class Caption(BaseModel):
    """One photo's description (`CaptionResult.to_dict`, plus the attention grid and the time taken)."""
    text: str = Field(description="what to show or say to a person: the caption, or a hedged description")
    caption: str = Field(description="the model's own sentence")
    confidence: float | None = Field(description="evidence for the least supported object named (for a description "
                                                 "made of concepts alone: how often such concepts are right); "
                                                 "null: unknown")
    concepts: list[Concept]
    score: float = Field(description="the decoder's score for the caption (higher: more likely)")
    tokens: list[str]
    alternatives: list[Alternative] = Field(description="with n_best > 1: the other captions, best first")
    attention: list[list[list[float]]] | None = Field(
        None, description="with attention=true: for each token, where the model looked (grid rows x columns)")
    grid: list[int] = Field(description="attention grid size: rows, columns")
    ms: float | None = Field(None, description="time spent on the request (/api/caption only)")
    source: str | None = Field(None, description="the uploaded file's name (/api/caption/batch only)")


class ItemError(BaseModel):
    """A file of a batch that could not be captioned; the others still are."""
    error: str = Field(description='"NAME: problem"', examples=["notes.txt: not an image"])


class Problem(BaseModel):
    """Every refusal: one line saying what was wrong."""
    detail: str


class Cue(BaseModel):
    start: float
    end: float | None
    text: str
    caption: str
    confidence: float | None
    tags: list[str]


class Video(BaseModel):
    cues: list[Cue] = Field(description="one per scene")
    vtt: str = Field(description="the cues as a WebVTT file")
    error: str | None = Field(description="the damage the description stopped at; its cues are kept")
    ms: float


# Request bodies: the routes read them as streams (to refuse an upload as soon as it passes the limit), so
# FastAPI cannot infer them; these go into each route's `openapi_extra`.
def upload_body(field: str, description: str, many: bool = False) -> dict:
    binary = {"type": "string", "format": "binary"}
    part = {"type": "array", "items": binary} if many else binary
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": {field: part},
                                                  "required": [field]}}}
    if not many:
        content["application/octet-stream"] = {"schema": binary}  # or the raw bytes as the whole body
    return {"requestBody": {"required": True, "description": description, "content": content}}


def refusals(*statuses: int) -> dict:
    """`responses=` entries for the refusals a route may answer with."""
    why = {400: "malformed request", 403: "cross-origin request from an origin not allowed",
           404: "not found", 413: "upload (or number of files) over the limit", 421: "Host is not this server's name",
           422: "not an image, or invalid parameters", 503: "busy (see Retry-After) or model not available"}
    return {s: {"model": Problem, "description": why[s]} for s in statuses}
