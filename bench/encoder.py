"""`vidgen bench encoder`: prompts/s of the prompt stage's encoding path at batch sizes 1, 8 and 32, and the cache hit.

The stage's own code runs (PromptEncoder.prepare: policy, one forward pass per batch, embeddings stored in the
cache's blobs), against a real blob store and no Kafka. Every round uses prompts never seen before, so nothing is a
cache hit; batch sizes take turns round by round so drift hits them all. The cache hit is what handle() pays for a
repeated prompt: the lookup in a fresh process (entry read from the store) and in a warm one (in memory).
"""
from __future__ import annotations

import argparse
import tempfile
import time

from consumers import prompt_encoder as stage_module
from consumers.embedding_cache import EmbeddingCache
from consumers.prompt_encoder import PromptEncoder
from producers.requests import video_request
from streams.blobs import LocalBlobStore
from streams.settings import load_settings

from .common import format_table, median, print_result

SUBJECTS = ["a red fox", "a lighthouse", "a paper boat", "an old violin", "a city tram", "two sleeping cats",
            "a glacier", "a hot-air balloon"]
SCENES = ["in fresh snow at dawn", "on a stormy night", "on a quiet pond", "in a dusty attic", "in heavy fog",
          "under a summer sky", "seen from a drone", "in slow motion"]


def fresh_prompts(count: int, salt: str) -> list[str]:
    return [f"{SUBJECTS[i % 8]} {SCENES[(i // 8) % 8]}, take {salt}-{i}" for i in range(count)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench encoder")
    parser.add_argument("--model", default="tiny-wan", help="model id or local model directory")
    parser.add_argument("--prompts", type=int, default=96, help="prompts per batch size per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory(prefix="vidgen-bench-encoder-") as tmp:
        settings = load_settings({"VIDGEN_VAR_DIR": tmp})
        blobs = LocalBlobStore(f"{tmp}/blobs")
        encoder = PromptEncoder(settings, blobs)
        params = dict(width=64, height=64, num_frames=5, steps=2, model=args.model)
        encoder.prepare([video_request("warm-up", job_id="warm-up", **params)])  # loads the model

        # The forward passes alone, timed inside the stage's own calls: the rest of prepare() is the policy and
        # the cache's blob writes (fsync'd), which batching does not shorten.
        forward_s = [0.0]
        encode = stage_module.encode_prompts

        def timed_encode(parts, prompts):
            started = time.perf_counter()
            try:
                return encode(parts, prompts)
            finally:
                forward_s[0] += time.perf_counter() - started

        stage_module.encode_prompts = timed_encode
        seconds: dict[int, list[float]] = {b: [] for b in batch_sizes}
        forward: dict[int, list[float]] = {b: [] for b in batch_sizes}
        for round_index in range(args.rounds):
            for batch in batch_sizes:
                forward_s[0] = 0.0
                prompts = fresh_prompts(args.prompts, f"r{round_index}b{batch}")
                requests = [video_request(p, job_id=f"{round_index}-{batch}-{i}", **params)
                            for i, p in enumerate(prompts)]
                started = time.perf_counter()
                for start in range(0, len(requests), batch):
                    encoder.prepare(requests[start:start + batch])
                seconds[batch].append(time.perf_counter() - started)
                forward[batch].append(forward_s[0])
        stage_module.encode_prompts = encode
        rate = {b: args.prompts / median(seconds[b]) for b in batch_sizes}
        forward_rate = {b: args.prompts / median(forward[b]) for b in batch_sizes}

        # The hit path: a repeated prompt, looked up by a fresh process (from the store) and a warm one (memory).
        repeated = video_request(fresh_prompts(1, "r0b1")[0], job_id="repeat", **params)
        text = encoder.models.text_encoder(args.model)
        cold_ms, warm_ms = [], []
        for _ in range(50):
            encoder.cache = EmbeddingCache(blobs)
            started = time.perf_counter()
            encoder.embeddings_for(repeated, text)
            cold_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            encoder.embeddings_for(repeated, text)
            warm_ms.append((time.perf_counter() - started) * 1000)
        assert encoder.cache.misses == 0, f"the repeated prompt must hit the cache ({encoder.cache.hits} hits, {encoder.cache.misses} misses)"

    rows = [(f"B={b}", args.prompts, median(seconds[b]), rate[b], rate[b] / rate[batch_sizes[0]], forward_rate[b])
            for b in batch_sizes]
    print(format_table(["batch", "prompts", "median_s", "prompts_per_s", "vs_first", "forward_only_per_s"], rows))
    print(f"cache hit: {median(cold_ms):.3f} ms from the store (fresh process), {median(warm_ms):.4f} ms in memory")
    print(f"encoder {text.encoder_id}, max_sequence_length {text.max_sequence_length}, {args.rounds} rounds")
    print_result(**{f"b{b}": rate[b] for b in batch_sizes}, cache_hit_ms=median(cold_ms),
                 cache_hit_memory_ms=median(warm_ms), **{f"forward_b{b}": forward_rate[b] for b in batch_sizes})
    return 0
