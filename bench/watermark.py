"""`vidgen bench watermark`: does a job's watermark survive H.264, and what does it cost per frame?

Clips are generated with the tiny built-in model (text encoding, denoising, VAE decoding: the platform's own
functions), one per seed and size; each is watermarked with its job's payload (compliance.watermark), encoded to MP4
at crf 23 as the decoder stage does, decoded, and read. Reported per clip: coded bits read right from one frame
alone (mean over frames) and after the vote across all frames, both before Reed–Solomon correction; whether the
payload came back exactly; the PSNR the mark costs; embed and read time per frame. Each unwatermarked clip is read
too: a payload from one would be a false positive.

The tiny model's output is faint, smooth grey noise, unlike real video, so a natural-image clip (scikit-image's
astronaut, panning) is reported beside it. The RESULT line's bit_accuracy / payload_exact / timings are from the
generated clips only; the natural clip's figures carry the suffix _natural.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from compliance import watermark as wm
from gpu_agents.denoise import denoise, prepare_latents
from gpu_agents.encoding import encode_prompts
from gpu_agents.models import ModelCatalogue
from gpu_agents.video import decode_latents, encode_mp4, read_mp4
from producers.requests import parse_size

from .common import format_table, median, print_result, timed

GUIDANCE_SCALE = 5.0


def generate_clip(catalogue: ModelCatalogue, model: str, prompt: str, width: int, height: int, num_frames: int,
                  steps: int, seed: int) -> np.ndarray:
    """Uint8 RGB frames (F, H, W, 3) from the model, as the platform's stages make them."""
    text = catalogue.text_encoder(model)
    parts = catalogue.denoiser(model)
    prompt_embeds, negative_embeds = encode_prompts(text, [prompt]), encode_prompts(text, [""])
    latents = prepare_latents(parts, width, height, num_frames, seed)
    latents = denoise(parts, parts.new_scheduler(), latents, prompt_embeds, negative_embeds, GUIDANCE_SCALE, steps)
    return decode_latents(catalogue.vae(model), latents)


def natural_clip(width: int, height: int, num_frames: int) -> np.ndarray:
    """scikit-image's astronaut, resized and panning 2 px down and 1 px right per frame."""
    import cv2
    from skimage import data

    side = max(width, height) + 2 * num_frames
    big = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    return np.stack([big[2 * i:2 * i + height, i:i + width] for i in range(num_frames)])


def psnr(reference: np.ndarray, changed: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - changed.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def measure(name: str, clip: np.ndarray, job_id: str, crf: int, fps: int) -> dict:
    payload = wm.payload_for_job(job_id)
    with timed() as embedding:
        result = wm.embed_watermark(clip, payload)
    if not result.embedded:
        raise SystemExit(f"{name}: not watermarked: {result.reason}")
    decoded = read_mp4(encode_mp4(result.frames, fps, crf=crf))
    with timed() as reading_time:
        reading = wm.read_watermark(decoded)
    unmarked = wm.read_watermark(read_mp4(encode_mp4(clip, fps, crf=crf)))
    expected = wm.coded_bits(payload)
    # The margin the vote across frames works with: bits read right from each frame on its own.
    single_frame = [wm.bit_accuracy((wm.bit_votes(frame[None]) > 0).astype(int), expected) for frame in decoded]
    return {
        "name": name,
        "size": f"{clip.shape[2]}x{clip.shape[1]}",
        "frames": len(clip),
        "bits_correct": int(round(wm.bit_accuracy(reading.bits, expected) * len(expected))),
        "bits": len(expected),
        "single_frame": float(np.mean(single_frame)),
        "exact": reading.payload == payload,
        "psnr": psnr(clip, result.frames),
        "embed_ms": embedding.seconds * 1000 / len(clip),
        "read_ms": reading_time.seconds * 1000 / len(decoded),
        "false_payload": unmarked.payload is not None,
    }


def summary(rows: list[dict]) -> dict:
    return {
        "bit_accuracy": sum(r["bits_correct"] for r in rows) / sum(r["bits"] for r in rows),
        "payload_exact": all(r["exact"] for r in rows),
        "embed_ms": median([r["embed_ms"] for r in rows]),
        "read_ms": median([r["read_ms"] for r in rows]),
        "false_payloads": sum(r["false_payload"] for r in rows),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vidgen bench watermark")
    parser.add_argument("--model", default="tiny-wan-5m")
    parser.add_argument("--sizes", default="256x256", help="comma-separated WxH, each at least 256x256")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated; one generated clip per seed and size")
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--prompt", default="a red fox trotting through fresh snow")
    parser.add_argument("--no-natural", action="store_true", help="skip the natural-image (astronaut) clip")
    args = parser.parse_args(argv)
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]

    catalogue = ModelCatalogue()
    wm.embed_watermark(natural_clip(256, 256, 1), wm.payload_for_job("warm-up"))  # first-call costs are not timed
    generated, natural = [], []
    for width, height in sizes:
        for seed in seeds:
            clip = generate_clip(catalogue, args.model, args.prompt, width, height, args.frames, args.steps, seed)
            generated.append(measure(f"{args.model} seed {seed}", clip, f"bench-{width}x{height}-{seed}",
                                     args.crf, args.fps))
        if not args.no_natural:
            natural.append(measure("astronaut (natural)", natural_clip(width, height, args.frames),
                                   f"bench-natural-{width}x{height}", args.crf, args.fps))

    headers = ("clip", "size", "frames", "1-frame bits", "bits correct", "payload exact", "PSNR dB", "embed ms/frame",
               "read ms/frame", "unmarked read")
    rows = [(r["name"], r["size"], r["frames"], f"{r['single_frame']:.1%}", f"{r['bits_correct']}/{r['bits']}", "yes" if r["exact"] else "NO",
             r["psnr"], r["embed_ms"], r["read_ms"], "PAYLOAD (false positive)" if r["false_payload"] else "none")
            for r in generated + natural]
    print(f"{wm.METHOD}: {wm.PAYLOAD_BYTES} payload + {wm.PARITY_BYTES} RS parity bytes = {wm.CODED_BITS} coded bits, "
          f"QIM step {wm.QIM_STEP:g}; H.264 crf {args.crf}; torch threads {torch.get_num_threads()}")
    print(format_table(headers, rows, float_format="{:.2f}"))
    gen = summary(generated)
    fields = dict(bit_accuracy=round(gen["bit_accuracy"], 4), payload_exact=str(gen["payload_exact"]).lower(),
                  clips=len(generated), crf=args.crf, embed_ms_per_frame=round(gen["embed_ms"], 2),
                  read_ms_per_frame=round(gen["read_ms"], 2))
    if natural:
        nat = summary(natural)
        fields.update(bit_accuracy_natural=round(nat["bit_accuracy"], 4),
                      payload_exact_natural=str(nat["payload_exact"]).lower())
    fields["false_payloads"] = gen["false_payloads"] + (summary(natural)["false_payloads"] if natural else 0)
    print("bit_accuracy, payload_exact and the timings are from the generated clips; *_natural from the astronaut")
    print_result(**fields, sizes=args.sizes, frames=args.frames)
    return 0
