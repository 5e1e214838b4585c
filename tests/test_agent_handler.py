"""The denoising agent's handler as a plain function (no Kafka): checkpoint cadence by steps and by time."""
from dataclasses import replace

import pytest

from gpu_agents.agent import DenoisingAgent
from gpu_agents.encoding import encode_prompts
from producers.requests import video_request
from streams import topics
from streams.blobs import LocalBlobStore
from streams.settings import load_settings
from streams.stage import SourceMessage, StageContext

PARAMS = dict(model="tiny-wan", width=32, height=32, num_frames=5, steps=8, guidance_scale=5.0, seed=3)


def _run(tmp_path, job_id, **cadence):
    settings = replace(load_settings({"VIDGEN_VAR_DIR": str(tmp_path)}), **cadence)
    blobs = LocalBlobStore(tmp_path / "blobs")
    agent = DenoisingAgent(settings, blobs)
    request = video_request("a clock tower", job_id=job_id, **PARAMS)
    text = agent.models.text_encoder("tiny-wan")
    job = {**request,
           "prompt_embeds": blobs.put_tensor(encode_prompts(text, [request["prompt"]]), job_id, "p.safetensors"),
           "negative_prompt_embeds": blobs.put_tensor(encode_prompts(text, [""]), job_id, "n.safetensors")}
    emitted = []
    ctx = StageContext("gpu-agent", SourceMessage(topics.ENCODED["free"].name, 0, 0, job_id), blobs,
                       lambda topic, event, key, headers: emitted.append((topic, event)))
    agent.handle(job, ctx)
    return [e["step"] for t, e in emitted if t == topics.LATENT_CHECKPOINTED]


@pytest.mark.parametrize(("cadence", "expected"), [
    (dict(checkpoint_every_steps=3, checkpoint_every_s=0.0), [3, 6]),
    (dict(checkpoint_every_steps=10**6, checkpoint_every_s=1e-9), [1, 2, 3, 4, 5, 6, 7]),  # time says every step
    (dict(checkpoint_every_steps=10**6, checkpoint_every_s=3600.0), []),
])
def test_checkpoint_cadence_by_steps_and_by_time(tmp_path, cadence, expected):
    assert _run(tmp_path, "cadence-job", **cadence) == expected  # never at the last step: the result follows
