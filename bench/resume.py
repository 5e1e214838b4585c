"""`vidgen bench resume`: SIGKILL the agent running a job, time until another agent resumes it, and check the
result is bit-identical to an uninterrupted run.

The real platform (embedded broker, registry, prompt encoder, two agents, decoder, compliance) with the client
settings of the embedded mode. The clock starts at the kill and stops at the event time of the first StepProgress
of the next attempt. The uninterrupted reference is diffusers' WanPipeline on the same model in this process.
"""
from __future__ import annotations

import argparse
import signal
import tempfile
import time

import torch

from consumers.progress import EventLog
from gpu_agents.models import ModelCatalogue
from gpu_agents.video import join_latent_chunks
from producers.requests import VideoRequests, parse_size
from streams import topics
from streams.blobs import open_blob_store
from streams.supervisor import PlatformProcesses

from .common import print_result


def agent_pid(step_event: dict) -> int:
    return int(step_event["agent_id"].rsplit("-", 1)[1].split(".")[0])  # <host>-<pid>.<random>


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench resume")
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--session-timeout-ms", type=int, default=None,
                        help="consumer session timeout (default: the embedded broker's client setting, 6000)")
    args = parser.parse_args(argv)
    width, height = parse_size(args.size)
    job = dict(model=args.model, width=width, height=height, num_frames=args.frames, steps=args.steps,
               guidance_scale=5.0, seed=42)
    prompt = "a lantern drifting down a river at night"

    env = {"VIDGEN_CHECKPOINT_EVERY_STEPS": str(args.every)}
    if args.session_timeout_ms:
        env["VIDGEN_KAFKA_SESSION_TIMEOUT_MS"] = str(args.session_timeout_ms)
    platform = PlatformProcesses(tempfile.mkdtemp(prefix="vidgen-bench-resume-"), env=env,
                                 stages=("prompt-encoder", "scheduler", "gpu-agent", "gpu-agent", "vae-decoder", "compliance"))
    settings = platform.start()
    log = EventLog(settings)
    try:
        with VideoRequests(settings) as requests:
            job_id = requests.submit(prompt, tier="premium", **job)
        first_checkpoint = log.wait_for(lambda l: l.of(job_id, topics.LATENT_CHECKPOINTED), 600, "a checkpoint")[0]
        victim = agent_pid(log.of(job_id, topics.STEP_PROGRESS)[0])
        platform.signal_stage(victim, signal.SIGKILL)
        killed_at = time.time()
        print(f"killed agent pid {victim} after its checkpoint at step {first_checkpoint['step']}")

        resumed = log.wait_for(lambda l: [s for s in l.of(job_id, topics.STEP_PROGRESS) if s["attempt"] > 1],
                               120, "the survivor to resume")[0]
        resume_s = resumed["timestamp"].timestamp() - killed_at
        print(f"resumed on pid {agent_pid(resumed)} from step {resumed['resumed_from_step']} after {resume_s:.2f} s")
        log.wait_for(lambda l: l.terminal(job_id), 600, "the job to end")
        time.sleep(1.0)  # a moment for a duplicate publication, were there one
        ends = log.terminal(job_id)
        published = [e for t, e in ends if t == topics.PUBLISHED.name]

        blobs = open_blob_store(settings)
        chunks = {c["chunk_index"]: c for c in log.of(job_id, topics.LATENT_CHUNKS)}
        latent = join_latent_chunks([blobs.get_tensor(chunks[i]["latent"]) for i in sorted(chunks)])
    finally:
        log.close()
        platform.stop()

    catalogue = ModelCatalogue()
    with torch.inference_mode():
        reference = catalogue.pipeline(args.model)(
            prompt=prompt, negative_prompt="", height=height, width=width, num_frames=args.frames,
            num_inference_steps=args.steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(42),
            output_type="latent", max_sequence_length=catalogue.max_sequence_length(args.model),
        ).frames
    bit_identical = torch.equal(latent, reference)
    print(f"final latent bit-identical to the uninterrupted run: {bit_identical}; "
          f"terminal events: {[t for t, _ in ends]}")
    print_result(resume_s=round(resume_s, 2), bit_identical=str(bit_identical).lower(),
                 resumed_from_step=resumed["resumed_from_step"], published=len(published), terminal=len(ends),
                 session_timeout_ms=args.session_timeout_ms or 6000, steps=args.steps, model=args.model)
    return 0 if bit_identical and len(published) == 1 and len(ends) == 1 else 1
