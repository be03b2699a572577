"""The HTTP contract as pydantic models; FastAPI publishes them in the OpenAPI document at /docs.

Conventions: sizes are ``{"width", "height"}`` objects; grids are ``[h, w]``; ``indices`` are raw
codebook indices in ``[0, K)``; ``tokens`` are the LLM-facing flat sequence (see ``service.tokens``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from vqtok.service.imaging import FitMode, OutputFormat


# An LLM vocabulary id (offset, bos, eos): non-negative and below 2**31, so that index + offset always
# fits the int64 arithmetic of service.tokens.
def _json_integer(value: Any) -> Any:
    """Refuse what JSON Schema's ``integer`` is not but pydantic's lax mode would read as one: ``true`` (1)
    and numeric strings ("5"). Numbers with no fractional part (5.0) stay integers, as JSON Schema says."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, str):
        raise PydanticCustomError(
            "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        )
    return value


# An integer in a JSON body (query and form values arrive as text and use plain ``int``).
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
JsonTokenId = Annotated[int, Field(ge=0, lt=2**31), BeforeValidator(_json_integer)]
# A value sent back to /decode: anything int64 holds; values outside [offset, offset + K) are refused
# later with their position, values beyond int64 here with their field location.
# The schema publishes JSON's exactly representable integers (|v| < 2^53): beyond them clients and
# fuzzers lose precision, and such a value is outside [offset, offset + K) anyway.
WireInt = Annotated[
    int, Field(ge=-(2**63), lt=2**63), BeforeValidator(_json_integer),
    WithJsonSchema({"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1}),
]


# ------------------------------------------------------------------------------------------------
# Request examples, one per input form: the OpenAPI document shows them (/docs, /redoc) and
# tests/test_openapi_docs.py sends each to a real server. Every value works with any model: the
# image is a real 8x8 PNG, sizes are multiples of 16, codes are below 64, the layout is a preset.
# ------------------------------------------------------------------------------------------------

EXAMPLE_PNG = (  # 8x8 RGB gradient
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAGUlEQVR42mNkYGhQYGDARCwMCgxYweCUAABobwJednxjlwAAAABJRU5ErkJggg=="
)

# /encode's examples carry only `images`: its options go in the query here (a body field overrides the query
# field of the same name, so an example with options would hide what the query says).
_OPTIONS_NOTE = ("Options (size, fit, offset, bos, eos, tokens, layout) go in the query, or as body fields, which "
                 "override the query's.")
ENCODE_JSON_EXAMPLES: dict[str, dict[str, Any]] = {
    "base64": {
        "summary": "One base64 image",
        "description": _OPTIONS_NOTE,
        "value": {"images": [EXAMPLE_PNG]},
    },
    "data_url": {
        "summary": "A data: URL",
        "description": _OPTIONS_NOTE,
        "value": {"images": [f"data:image/png;base64,{EXAMPLE_PNG}"]},
    },
    "several": {
        "summary": "Several images, either form",
        "description": "One entry per image in the answer, in order. " + _OPTIONS_NOTE,
        "value": {"images": [EXAMPLE_PNG, f"data:image/png;base64,{EXAMPLE_PNG}"]},
    },
}

# lumina-like: boi 8197, size prefix 8804 + h and 8804 + w, each row's ids (offset 4) then eol 8803, eoi 8196.
_LUMINA_2X3 = [8197, 8806, 8807, 5, 6, 7, 8803, 8, 9, 10, 8803, 8196]

DECODE_EXAMPLES: dict[str, dict[str, Any]] = {
    "indices": {
        "summary": "One grid of raw codes (answers with the PNG)",
        "value": {"indices": [[1, 2, 3], [4, 5, 6]]},
    },
    "several_grids": {
        "summary": "Several grids (answers JSON with base64 WebP images, cropped)",
        "value": {"indices": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]], "format": "webp", "quality": 90,
                  "crop_to": {"width": 6, "height": 5}},
    },
    "flat_tokens": {
        "summary": "Flat LLM tokens with their offset, bos, eos and grid",
        "value": {"tokens": [31998, 32001, 32002, 32003, 32004, 32005, 32006, 31999], "grid": [2, 3],
                  "offset": 32000, "bos": 31998, "eos": 31999, "format": "jpeg"},
    },
    "layout": {
        "summary": "Tokens in a layout that carries the grid (no `grid` needed)",
        "value": {"tokens": _LUMINA_2X3, "layout": "lumina-like"},
    },
    "lenient": {
        "summary": "A sequence cut short, repaired leniently (repairs reported)",
        "description": "With `Accept: application/json` the repairs are in the JSON; on an image answer, in the "
                       "x-vqtok-repairs headers.",
        "value": {"tokens": _LUMINA_2X3[:9], "layout": "lumina-like", "repair": "lenient"},
    },
    "extract": {
        "summary": "Images inside a mixed sequence (text ids around them)",
        "value": {"tokens": [101, 102, *_LUMINA_2X3, 103], "layout": "lumina-like", "extract": True},
    },
}


def _values(examples: dict[str, dict[str, Any]]) -> list[Any]:
    return [example["value"] for example in examples.values()]


# 'N' or 'WxH', positive, at most six digits each (what service.imaging.parse_size reads).
SIZE_PATTERN = r"^\s*[1-9][0-9]{0,5}\s*(?:[xX×]\s*[1-9][0-9]{0,5})?\s*$"


class ErrorResponse(BaseModel):
    """Every non-2xx answer."""

    error: str = Field(description="what was wrong and where", examples=["indices[0][3][5] = 600 is outside [0, 512)"])
    error_type: str = Field(description="kind of error", examples=["invalid_request"])


class ModelIdentity(BaseModel):
    """Which tokenizer produced or reads the tokens: compare ``model_id`` before mixing token sets."""

    name: str = Field(description="the checkpoint's name (its provenance name)",
                      examples=["vqtok-default-f4-photos-v1"])
    weights_sha256: str = Field(description="sha256 of the weights file alone")
    model_id: str = Field(
        description="sha256 over the weights and every config field that changes tokens (architecture, "
        "codebook size, pixel normalisation): equal ids tokenize identically; compare it before mixing token sets"
    )
    num_embeddings: int = Field(description="K: indices are in [0, K)")
    embedding_dim: int = Field(description="D: size of one codebook vector")
    downsample: int = Field(description="f: image side / grid side")


class ImageSize(BaseModel):
    """An image size in pixels."""

    width: JsonInt = Field(ge=1, description="pixels across")
    height: JsonInt = Field(ge=1, description="pixels down")


# A loaded layout's name (GET /layouts): a preset or a layout file's `name`.
LayoutName = Annotated[str, Field(min_length=1, max_length=200)]
RepairPolicy = Literal["strict", "lenient"]
GridSide = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]


#: Where an /encode target size came from: the request's ``size``, the server's ``default_size`` setting, or the
#: checkpoint's native size (its record's ``serving.size``, e.g. 256 for LlamaGen, 512 for Chameleon).
SizeSource = Literal["request", "default_size", "checkpoint"]


class EncodeOptions(BaseModel):
    """Options of ``POST /encode``, as query parameters, multipart form fields or JSON body fields."""

    model_config = ConfigDict(extra="forbid")

    size: str | None = Field(
        None, description="target size 'N' (square) or 'WxH', multiples of the downsample factor; "
        "default: the server's default_size, else the checkpoint's native size (imported models: LlamaGen 256, "
        "Chameleon 512, with their fit, crop, unless `fit` is given), else each image's own size",
        examples=["256", "320x240"],
        # published for clients (parse_size enforces it with its own message, naming the value)
        json_schema_extra={"pattern": SIZE_PATTERN},
    )
    fit: FitMode = Field(
        "pad", description="pad: keep the aspect, pad bottom/right with replicated edge pixels (content_size "
        "says what to crop back); crop: cover and centre-crop; resize: stretch; none: refuse sizes that are not "
        "multiples of the downsample factor",
    )
    offset: TokenId = Field(
        0, description="added to every index in `tokens` (placing image tokens in an LLM vocabulary)"
    )
    bos: TokenId | None = Field(None, description="begin-of-image id put before `tokens`")
    eos: TokenId | None = Field(None, description="end-of-image id put after `tokens`")
    tokens: bool = Field(False, description="include `tokens` (implied by offset, bos, eos or layout)")
    layout: LayoutName | None = Field(
        None, description="token layout of `tokens` (GET /layouts lists the loaded ones; default: the server's "
        "`layout` setting). offset/bos/eos are the `flat` layout's: with another layout they are refused",
    )

    @property
    def want_tokens(self) -> bool:
        return self.tokens or self.offset != 0 or self.bos is not None or self.eos is not None


class EncodeJSONRequest(EncodeOptions):
    """``POST /encode`` with ``Content-Type: application/json``; option fields here override the query.

    The options are those of ``EncodeOptions`` with JSON's types (no "5" for 5, no 1 for true)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": _values(ENCODE_JSON_EXAMPLES)})

    offset: JsonTokenId = Field(0, description=EncodeOptions.model_fields["offset"].description)
    bos: JsonTokenId | None = Field(None, description=EncodeOptions.model_fields["bos"].description)
    eos: JsonTokenId | None = Field(None, description=EncodeOptions.model_fields["eos"].description)
    tokens: StrictBool = Field(False, description=EncodeOptions.model_fields["tokens"].description)

    # minItems/minLength are published for clients; the handler refuses empty input with its own message.
    images: list[Annotated[str, Field(json_schema_extra={"format": "byte", "minLength": 1})]] = Field(
        json_schema_extra={"minItems": 1},
        description="base64 image files (PNG, JPEG, WebP, GIF, BMP, TIFF); data: URLs accepted. Bytes that are "
        "no image in a supported format are a 415",
    )


class EncodedImage(BaseModel):
    indices: list[list[int]] = Field(description="h x w grid of raw codebook indices in [0, K), row-major")
    grid: tuple[int, int] = Field(description="[h, w]")
    original_size: ImageSize = Field(description="the uploaded image")
    encoded_size: ImageSize = Field(description="what the model saw: grid * downsample")
    content_size: ImageSize = Field(
        description="top-left region of the encoded image holding the picture; send it as /decode crop_to"
    )
    tokens: list[int] | None = Field(
        None, description="the grid as an LLM reads it: with the flat layout [bos] + (indices + offset) + [eos], "
        "else the sequence of `layout`; present when asked for (or a layout is in use). null when not asked for: "
        "every image has the same keys (like `bos`/`eos`, which are null when not given), so a client reads "
        "`image['tokens']` without a key check and null says plainly 'not requested' rather than 'empty'"
    )


class EncodeResponse(BaseModel):
    """``POST /encode`` as JSON: the model that made the tokens, the options as applied, one entry per image."""

    model: ModelIdentity = Field(description="the tokenizer that produced these indices (compare `model_id`)")
    fit: FitMode = Field(description="how each image was fitted to its encoded size (the request's `fit`, or the "
                                     "checkpoint's when its native size was used and the request named no fit)")
    size_from: SizeSource | None = Field(
        None, description="where the target size came from: request (`size`), default_size (the server "
        "setting) or checkpoint (the model's native size, used when neither is given); null: each image kept "
        "its own size")
    offset: int = Field(description="the flat layout's offset added to every index in `tokens` (0: none)")
    bos: int | None = Field(description="the flat layout's begin-of-image id put before `tokens` (null: none)")
    eos: int | None = Field(description="the flat layout's end-of-image id put after `tokens` (null: none)")
    layout: str | None = Field(None, description="the layout of `tokens`, when a layout was asked for or is the "
                                                 "server's default (absent: today's flat offset/bos/eos tokens)")
    images: list[EncodedImage] = Field(description="one per image sent, in the order sent")


def _one_grid_source(schema: dict[str, Any]) -> None:
    """Make ``DecodeRequest``'s schema say what its validator enforces: exactly one of ``indices`` or
    ``tokens`` (with ``grid``), none of the three null (leave a field out instead)."""
    def non_empty(node: dict[str, Any]) -> None:  # every nesting level holds at least one item
        if node.get("type") == "array":
            node.setdefault("minItems", 1)
            for child in [node.get("items"), *node.get("prefixItems", [])]:
                if isinstance(child, dict):
                    non_empty(child)
                    if child.get("type") == "integer" and name == "grid":
                        child["minimum"] = 1  # a grid is at least 1x1
        for branch in node.get("anyOf", []):
            non_empty(branch)

    for name in ("indices", "tokens", "grid", "layout"):
        field = schema["properties"][name]
        field["anyOf"] = [branch for branch in field["anyOf"] if branch.get("type") != "null"]
        field.pop("default", None)
        non_empty(field)
    schema["oneOf"] = [
        {"required": ["indices"], "not": {"anyOf": [{"required": ["tokens"]}, {"required": ["layout"]},
                                                     {"required": ["extract"]}, {"required": ["repair"]},
                                                     {"required": ["pad"]}]}},
        {"required": ["tokens"], "not": {"required": ["indices"]},
         "anyOf": [{"required": ["grid"]}, {"required": ["layout"]}]},
    ]


def _decode_schema(schema: dict[str, Any]) -> None:
    _one_grid_source(schema)
    schema["examples"] = _values(DECODE_EXAMPLES)


class DecodeRequest(BaseModel):
    """``POST /decode``: one or several grids as ``indices``, or as ``tokens`` (with their ``grid``, or a
    ``layout`` that carries it)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema: _decode_schema(schema))

    indices: list[list[list[WireInt]]] | list[list[WireInt]] | None = Field(
        None, description="one h x w grid, or a list of grids; `offset` is subtracted from every value"
    )
    tokens: list[list[WireInt]] | list[WireInt] | None = Field(
        None, description="one flat sequence (or a list of them) as an LLM produced it; a leading `bos` and a "
        "trailing `eos` are stripped when present, then `offset` is subtracted",
    )
    grid: tuple[JsonInt, JsonInt] | None = Field(
        None, description="[h, w] of every `tokens` sequence; with a layout that carries the shape (size prefix, "
        "end-of-row ids, a fixed grid) it may be left out"
    )
    offset: JsonTokenId = Field(
        0, description="the flat layout's offset: subtracted from every value of `indices` or `tokens` (the "
        "`offset` given to /encode); with another `layout` it is refused"
    )
    bos: JsonTokenId | None = Field(
        None, description="the flat layout's begin-of-image id: a leading `bos` in `tokens` is stripped when "
        "present (the `bos` given to /encode)"
    )
    eos: JsonTokenId | None = Field(
        None, description="the flat layout's end-of-image id: a trailing `eos` in `tokens` is stripped when "
        "present (the `eos` given to /encode)"
    )
    format: OutputFormat = Field("png", description="image format of the answer")
    quality: JsonInt = Field(95, ge=1, le=100, description="JPEG / WebP quality")
    crop_to: ImageSize | list[ImageSize] | None = Field(
        None, description="the content_size /encode reported (one for all grids, or one per grid): "
        "the decoded image is cropped to its top-left region of that size",
    )
    layout: LayoutName | None = Field(
        None, description="the layout of `tokens` (GET /layouts; default: the server's `layout` setting); "
        "offset/bos/eos are the flat layout's and are refused with another one",
    )
    repair: RepairPolicy = Field(
        "strict", description="strict: any deviation from the layout is a 422 naming the position; lenient: "
        "missing structure ids, short or long rows, a sequence cut short, stray or extra ids are repaired and "
        "reported (`repairs` in JSON, x-vqtok-repairs headers on an image answer)",
    )
    pad: Literal["repeat_last_row"] | JsonTokenId = Field(
        "repeat_last_row", description="lenient: what fills missing cells: repeat the row above, or a code in [0, K)"
    )
    extract: StrictBool = Field(
        False, description="decode every begin..end-of-image span of a mixed sequence (text ids around); the "
        "answer is JSON with each image's `span` in its sequence"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DecodeRequest:
        if (self.indices is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'indices' or 'tokens'")
        if self.indices is not None:
            given = [name for name in ("layout", "extract", "repair", "pad") if name in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only with 'tokens' ('indices' are raw codes, in no layout)")
        return self  # 'tokens' without 'grid': the handler asks for it unless the layout carries the grid

    @property
    def flat_framing(self) -> bool:
        """offset, bos or eos given: the request speaks the flat layout."""
        return self.offset != 0 or self.bos is not None or self.eos is not None


class RepairInfo(BaseModel):
    """One change lenient decoding made to a token sequence."""

    position: int = Field(description="index in the sequence (for a missing id: where it was assumed)")
    kind: Literal["missing", "short_row", "cut_short", "long_row", "replaced", "unexpected", "extra", "size"] = (
        Field(description="missing: a structure id (or the size prefix) assumed; short_row: a row ended early, "
                          "its cells padded; long_row: a row's extra cells dropped; cut_short: the sequence ended "
                          "inside the image, the rest padded; replaced: a cell that was no image id, padded; "
                          "unexpected: an id where a structure id belonged, dropped; extra: ids after the end, "
                          "dropped; size: a size prefix for another grid, replaced")
    )
    detail: str = Field(description="what was repaired, in words")


class DecodedImage(BaseModel):
    image: str = Field(description="base64 image file")
    media_type: str = Field(description="the image's media type (from `format`)", examples=["image/png"])
    width: int = Field(description="image width in pixels (grid width x f, or crop_to's)")
    height: int = Field(description="image height in pixels (grid height x f, or crop_to's)")
    grid: tuple[int, int] = Field(description="[h, w] of the decoded grid")
    repairs: list[RepairInfo] | None = Field(None, description="with a layout: what lenient decoding repaired "
                                                               "(empty: nothing)")
    sequence: int | None = Field(None, description="extract: the index of the `tokens` sequence holding the image")
    span: tuple[int, int] | None = Field(None, description="extract: [start, end) of the image in its sequence")


class DecodeResponse(BaseModel):
    """Several grids: JSON with base64 images (one grid answers with the image bytes themselves)."""

    model: ModelIdentity = Field(description="the tokenizer that decoded the grids")
    layout: str | None = Field(None, description="the layout the tokens were read with (absent: flat offset/bos/eos)")
    images: list[DecodedImage] = Field(description="one per grid, in order")


class LayoutsResponse(BaseModel):
    """``GET /layouts``: every loaded layout's spec, by name."""

    default: str = Field(description="the layout used when a request names none")
    layouts: dict[str, dict[str, Any]] = Field(description="name -> the layout's spec (the layout file's JSON)")


class AllowedRequest(BaseModel):
    """``POST /layouts/{name}/allowed``: the layout's sequence so far, from its first token."""

    model_config = ConfigDict(extra="forbid")

    prefix: list[WireInt] = Field(description="the ids generated so far (the layout's first token first)")
    grid: tuple[GridSide, GridSide] | None = Field(
        None, description="[h, w] of the image to generate; default: the layout's fixed grid, or the grid the "
        "size prefix in `prefix` names"
    )


class AllowedResponse(BaseModel):
    allowed: list[int] = Field(description="the ids that may come next, ascending (empty: the image is complete)")


class CodebookResponse(BaseModel):
    """``GET /codebook``."""

    model: ModelIdentity = Field(description="the tokenizer whose codebook this is")
    num_embeddings: int = Field(description="K: the number of codes")
    embedding_dim: int = Field(description="D: channels the quantizer hands the decoder")
    code_dim: int = Field(description="width of the vectors below: D, or the low-dimensional search space of "
                                      "factorised codes (code_dim), or the number of FSQ channels")
    quantizer: str = Field(description="ema, plain (learned codebooks) or fsq (fixed grid of levels)")
    l2_normalized: bool = Field(description="codes are unit vectors and the search is by cosine similarity")
    downsample: int = Field(description="f: image side / grid side")
    usage: list[int] | None = Field(description="per-code counts recorded at training time (the final held-out "
                                          "evaluation), if the checkpoint has them")
    perplexity: float | None = Field(description="exp(entropy) of the usage distribution (K = perfectly even); "
                                                  "without counts, the recorded held-out perplexity")
    codes_used: int | None = Field(description="codes with a non-zero usage count")
    vectors: list[list[float]] | None = Field(None, description="(K, code_dim) codebook, with ?include=vectors")


class InfoResponse(BaseModel):
    """``GET /info``."""

    model: ModelIdentity = Field(description="the loaded tokenizer")
    config: dict[str, Any] = Field(description="the checkpoint's network config (all that encode and decode read)")
    checkpoint: dict[str, Any] = Field(
        description="the checkpoint folder's name and its record's other sections: format, format_version, "
                    "codebook_training, provenance (name, steps, training, data, hardware, ...), metrics"
    )
    device: str = Field(description="where the model runs", examples=["cpu", "cuda:0"])
    dtype: str = Field(description="compute dtype of the convolutions (the quantizer always runs in float32)")
    limits: dict[str, Any] = Field(description="every request limit in force (the VQTOK_MAX_* settings), by name")
    layout: str = Field(description="the default token layout (GET /layouts lists them all)")
    layouts: list[str] = Field(description="the names of the loaded layouts")
    auth: bool = Field(description="whether an API key is required")
    version: str = Field(description="the vqtok version serving")
    ready: bool = Field(description="always true: /info answers 503 until the model is ready")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field("ok", description="the process is up (the model may still be loading)")


class ReadyResponse(BaseModel):
    ready: bool = Field(description="the model is loaded and warmed up")
    status: str = Field(description="'ready'")
