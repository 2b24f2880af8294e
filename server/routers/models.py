"""GET /v1/models: the served models with their rates, stages, bitrates and whether they are trained."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import RuntimeDep
from server.errors import problem_responses
from server.schemas import ModelInfo, ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, responses=problem_responses(500, 503), summary="List models")
async def list_models(runtime: RuntimeDep) -> ModelsResponse:
    """Every model this server decodes and encodes with; 503 until they are loaded."""
    runtime.require_ready()
    infos = []
    for served in runtime.models.values():
        m = served.model
        infos.append(
            ModelInfo(
                id=served.model_id,
                default=served.model_id == runtime.default_model_id,
                trained=served.pretrained.trained,
                sample_rate=m.sample_rate,
                hop_length=m.hop_length,
                frame_rate=m.frame_rate,
                n_stages=m.n_stages,
                codebook_sizes=list(m.codebook_sizes),
                stage_bits=list(m.stage_bits),
                codebook_size=None if m.bits_per_code is None else 1 << m.bits_per_code,
                bits_per_code=m.bits_per_code,
                bitrates_kbps=[m.bitrate(s) / 1000 for s in range(1, m.n_stages + 1)],
                weights_hash=served.pretrained.weights_hash.hex(),
            )
        )
    return ModelsResponse(models=infos)
