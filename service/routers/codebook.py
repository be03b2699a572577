"""``GET /codebook``: codebook size, the usage recorded at training, and the vectors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Query, Response

from vqtok.service.dependencies import AcceptsNpy, Ready, ReadyModel
from vqtok.service.responses import ERROR_RESPONSES, NPY, model_headers, npy_bytes
from vqtok.service.schemas import CodebookResponse

router = APIRouter(tags=["codebook"])


async def _vectors(ready: Ready) -> torch.Tensor:
    """The (K, code_dim) codebook, read on the inference thread (never racing a batch)."""
    vectors = await ready.batcher.run_in_inference_thread(ready.engine.codebook_vectors)
    assert isinstance(vectors, torch.Tensor)
    return vectors


@router.get(
    "/codebook",
    response_model=CodebookResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {NPY: {"description": "(K, code_dim) float32 vectors"}}}},
    summary="Codebook size, usage and vectors",
)
async def codebook(
    ready: ReadyModel,
    want_npy: AcceptsNpy,
    include: Annotated[Literal["vectors"] | None, Query(description="'vectors' adds the (K, code_dim) vectors")] = None,
) -> Any:
    engine = ready.engine
    if want_npy:
        vectors = (await _vectors(ready)).numpy().astype(np.float32)
        return Response(npy_bytes(vectors), media_type=NPY, headers=model_headers(engine))
    usage, perplexity, codes_used = engine.codebook_usage()
    config = engine.config
    return CodebookResponse(
        model=engine.identity(), num_embeddings=config.num_embeddings, embedding_dim=config.embedding_dim,
        code_dim=config.code_vector_dim, quantizer=config.quantizer, l2_normalized=config.l2_normalize,
        downsample=config.downsample, usage=usage, perplexity=perplexity, codes_used=codes_used,
        vectors=(await _vectors(ready)).tolist() if include == "vectors" else None,
    )
