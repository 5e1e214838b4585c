"""An audio track (AAC) through the media path: fMP4 segments, the joined video, encode_mp4, renditions, the
compliance stage (watermark in the frames, C2PA over the whole file) and `vidgen verify`."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

import tests.test_compliance_stage as compliance_stage_tests
from compliance.provenance import ensure_dev_chain, verify_video
from compliance.renditions import encode_renditions, hls_media, hls_vod_playlist
from compliance.watermark import payload_for_job, read_watermark
from consumers.verify import verify_file
from gpu_agents.segments import (audio_packet_boundary, encode_init_and_segment, join_segments,
                                 top_level_boxes)
from gpu_agents.video import (AAC_FRAME_SAMPLES, add_aac_stream, encode_aac, encode_mp4, probe_mp4, read_audio,
                              read_mp4)
from streams import topics
from tests.test_video import _gradient_clip

SAMPLE_RATE = 24000  # LTX-2's
FPS = 16
CHUNKS = [5, 8, 8]  # a 21-frame job in three chunks, as the decoder makes them
NUM_FRAMES = sum(CHUNKS)
TONE_HZ = 440.0


def tone(num_samples: int, frequencies: tuple[float, ...] = (TONE_HZ,)) -> np.ndarray:
    """One sine per channel, at half scale."""
    t = np.arange(num_samples) / SAMPLE_RATE
    return np.stack([0.5 * np.sin(2 * np.pi * f * t) for f in frequencies], axis=1).astype(np.float32)


def noise(num_samples: int) -> np.ndarray:
    """Mono noise: unlike a sine, it correlates with itself at one lag only, which pins down any time shift."""
    return np.random.default_rng(11).uniform(-0.5, 0.5, (num_samples, 1)).astype(np.float32)


def peak_hz(waveform: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / SAMPLE_RATE)[np.argmax(spectrum)])


def lag_samples(decoded: np.ndarray, original: np.ndarray, max_lag: int = 2000) -> int:
    """The shift of `decoded` against `original` (positive: late), by cross-correlation over the middle."""
    middle = original[max_lag:-max_lag]
    scores = [np.dot(decoded[max_lag + lag:max_lag + lag + len(middle)], middle) for lag in range(-max_lag, max_lag)]
    return int(np.argmax(scores)) - max_lag


def encode_chunked(frames: np.ndarray, audio: np.ndarray, chunks=CHUNKS, fps: float = FPS):
    """(init segments, media segments, first frame of each chunk) of a job encoded chunk by chunk with sound."""
    starts = np.cumsum([0] + chunks[:-1]).tolist()
    pairs = [encode_init_and_segment(frames[start:start + size], fps, start, audio=audio, sample_rate=SAMPLE_RATE)
             for start, size in zip(starts, chunks)]
    return [init for init, _ in pairs], [segment for _, segment in pairs], starts


def audio_packets(data: bytes) -> list[av.Packet]:
    with av.open(io.BytesIO(data)) as container:
        return [packet for packet in container.demux(audio=0) if packet.size > 0]


def stream_starts_s(data: bytes) -> tuple[float, float]:
    """When the first frame and the first audio sample (the AAC priming packet's, if the track keeps it) play."""
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return float(video.start_time * video.time_base), float(audio.start_time * audio.time_base)


@pytest.fixture(scope="module")
def clip():
    return _gradient_clip(NUM_FRAMES, 64, 64)


@pytest.fixture(scope="module")
def tone_job(clip):
    # A little longer than the video: the segments cut it where the last chunk ends.
    audio = tone(NUM_FRAMES * SAMPLE_RATE // FPS + 700)
    inits, segments, starts = encode_chunked(clip, audio)
    return audio, inits, segments, starts


def test_every_segment_decodes_with_both_streams_on_the_jobs_timeline(tone_job):
    audio, inits, segments, starts = tone_job
    for init, segment, start, size in zip(inits, segments, starts, CHUNKS):
        data = init + segment
        with av.open(io.BytesIO(data)) as container:
            assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
            assert len(list(container.decode(video=0))) == size
        packets = audio_packets(data)
        first, end = packets[0].pts, packets[-1].pts + packets[-1].duration
        video_start, video_end = start * SAMPLE_RATE // FPS, (start + size) * SAMPLE_RATE // FPS
        # Each segment's sound starts at the AAC packet nearest its first frame, and lasts as long within a packet.
        assert first == audio_packet_boundary(start, FPS, SAMPLE_RATE)
        assert abs(first - video_start) <= AAC_FRAME_SAMPLES // 2
        assert abs((end - first) - (video_end - video_start)) < AAC_FRAME_SAMPLES
        assert probe_mp4(data)["audio"]["duration_s"] == pytest.approx((end - first) / SAMPLE_RATE, abs=1e-9)
        # Decoded alone, it is the input at its own place on the timeline, past its first two packets: the first
        # decodes right only after the previous segment's last, and the job's first two carry the tone's abrupt onset.
        settled = first + 2 * AAC_FRAME_SAMPLES
        decoded = read_audio(data).waveform[settled:end, 0]
        assert np.sqrt(np.mean((decoded - audio[settled:end, 0]) ** 2)) < 0.01


def test_init_segment_is_identical_for_every_chunk_with_sound(tone_job):
    _, inits, _, _ = tone_job
    assert len(set(inits)) == 1
    with av.open(io.BytesIO(inits[0])) as container:
        audio = container.streams.audio[0].codec_context
        assert (audio.name, audio.sample_rate, len(audio.layout.channels)) == ("aac", SAMPLE_RATE, 1)


def test_joined_video_has_as_much_sound_as_pictures_and_the_tone_comes_back(tone_job, clip):
    audio, inits, segments, _ = tone_job
    joined = join_segments(inits[0], segments)
    probe = probe_mp4(joined)
    assert probe["frames"] == NUM_FRAMES
    assert probe["audio"]["codec"] == "aac" and probe["audio"]["channels"] == 1
    assert abs(probe["audio"]["duration_s"] - NUM_FRAMES / FPS) <= 1 / FPS
    decoded = read_audio(joined)
    assert decoded.sample_rate == SAMPLE_RATE
    assert abs(len(decoded.waveform) / SAMPLE_RATE - NUM_FRAMES / FPS) <= 1 / FPS
    assert peak_hz(decoded.waveform[2048:, 0]) == pytest.approx(TONE_HZ, abs=5)
    assert np.abs(read_mp4(joined).astype(int) - clip).mean() < 8


def test_joined_sound_is_one_continuous_encode_without_a_shift(clip):
    """The segments' packets are those of one encode of the whole track: no seam at the chunk boundaries."""
    audio = noise(NUM_FRAMES * SAMPLE_RATE // FPS + 5000)  # sound after the cut: the last packets look ahead at it
    inits, segments, _ = encode_chunked(clip, audio)
    joined = join_segments(inits[0], segments)
    with av.open(io.BytesIO(), mode="w", format="mp4") as scratch:
        whole = encode_aac(add_aac_stream(scratch, SAMPLE_RATE, 1), audio)
    end = audio_packet_boundary(NUM_FRAMES, FPS, SAMPLE_RATE)
    expected = [(packet.pts, bytes(packet)) for packet in whole if 0 <= packet.pts < end]
    assert [(packet.pts, bytes(packet)) for packet in audio_packets(joined)] == expected
    decoded = read_audio(joined).waveform[:, 0]
    assert lag_samples(decoded, audio[:len(decoded), 0]) == 0


@pytest.mark.parametrize("fps", [16, 24, 24000 / 1001, 25])
def test_sound_lines_up_for_common_frame_rates(fps):
    chunks = [1, 8, 8, 8]
    frames = _gradient_clip(sum(chunks), 32, 32)
    video_s = sum(chunks) / fps
    inits, segments, _ = encode_chunked(frames, tone(round(video_s * SAMPLE_RATE)), chunks, fps)
    assert len(set(inits)) == 1
    assert abs(probe_mp4(join_segments(inits[0], segments))["audio"]["duration_s"] - video_s) <= 1 / fps


def test_mp4_sound_is_exact_to_the_sample_and_stereo_stays_apart():
    frames = _gradient_clip(17, 32, 32)
    fps = 24000 / 1001
    num_samples = round(17 * SAMPLE_RATE * 1001 / 24000)  # 17017
    data = encode_mp4(frames, fps, audio=tone(num_samples, (TONE_HZ, 660.0)), sample_rate=SAMPLE_RATE)
    probe = probe_mp4(data)
    assert probe["audio"] == {"codec": "aac", "sample_rate": SAMPLE_RATE, "channels": 2,
                              "duration_s": pytest.approx(num_samples / SAMPLE_RATE, abs=1e-9)}
    decoded = read_audio(data).waveform
    assert decoded.shape == (num_samples, 2)
    assert peak_hz(decoded[2048:, 0]) == pytest.approx(TONE_HZ, abs=5)
    assert peak_hz(decoded[2048:, 1]) == pytest.approx(660.0, abs=5)


@pytest.mark.parametrize("num_samples", [9000, 30000])  # the video lasts 12000 samples
def test_mp4_sound_is_padded_or_cut_to_the_video(num_samples):
    audio = noise(num_samples)
    decoded = read_audio(encode_mp4(_gradient_clip(8, 32, 32), FPS, audio=audio, sample_rate=SAMPLE_RATE)).waveform
    assert decoded.shape == (12000, 1)
    assert np.abs(decoded[9500:12000]).max() < (0.02 if num_samples < 12000 else 1.0)  # silence where padded
    assert lag_samples(decoded[:9000, 0], audio[:9000, 0], max_lag=1000) == 0


def test_video_only_outputs_have_no_audio_track():
    frames = _gradient_clip(5, 32, 32)
    init, segment = encode_init_and_segment(frames, FPS, 0)
    for data in (init + segment, encode_mp4(frames, FPS)):
        assert "audio" not in probe_mp4(data)
        assert read_audio(data) is None


@pytest.mark.parametrize("audio, sample_rate, message", [
    (np.zeros(100, np.float32), SAMPLE_RATE, "samples, channels"),
    (np.zeros((100, 3), np.float32), SAMPLE_RATE, "1 or 2 channels"),
    (np.zeros((100, 1), np.int16), SAMPLE_RATE, "float"),
    (np.zeros((0, 1), np.float32), SAMPLE_RATE, "no samples"),
    (np.full((100, 1), np.nan, np.float32), SAMPLE_RATE, "NaN"),
    (np.zeros((100, 1), np.float32), 0, "positive"),
    (np.zeros((100, 1), np.float32), -24000, "positive"),
    (np.zeros((100, 1), np.float32), 24000.0, "positive integer"),
    (np.zeros((100, 1), np.float32), 12345, "AAC cannot carry 12345 Hz"),
    (np.zeros((100, 1), np.float32), None, "give both or neither"),
    (None, SAMPLE_RATE, "give both or neither"),
])
def test_bad_audio_is_refused_with_the_reason(audio, sample_rate, message):
    frames = _gradient_clip(2, 32, 32)
    with pytest.raises(ValueError, match=message):
        encode_mp4(frames, FPS, audio=audio, sample_rate=sample_rate)
    with pytest.raises(ValueError, match=message):
        encode_init_and_segment(frames, FPS, 0, audio=audio, sample_rate=sample_rate)


def test_every_rendition_and_its_hls_copy_keep_the_sound():
    audio = tone(9 * SAMPLE_RATE // 8)
    renditions = encode_renditions(_gradient_clip(9, 64, 96), 8, audio=audio, sample_rate=SAMPLE_RATE)
    assert len(renditions) == 2
    for rendition in renditions:
        assert probe_mp4(rendition.data)["audio"]["duration_s"] == pytest.approx(9 / 8, abs=1e-9)
        assert peak_hz(read_audio(rendition.data).waveform[2048:, 0]) == pytest.approx(TONE_HZ, abs=5)
        hls = hls_media(rendition, f"{rendition.name}.m4s")
        # Stream copy: the same AAC packets, and the sound starts with the pictures. (FFmpeg's HLS muxer moves both
        # tracks by the video's first decode time, 2 frames before 0 with B-frames, and keeps the AAC priming packet
        # in the timeline just before the sound's start; its edit lists round to milliseconds.)
        assert [bytes(packet) for packet in audio_packets(hls.segment_data)] == [
            bytes(packet) for packet in audio_packets(rendition.data)]
        video_start, priming_start = stream_starts_s(hls.segment_data)
        assert abs(priming_start + AAC_FRAME_SAMPLES / SAMPLE_RATE - video_start) < 0.001
    playlist = hls_vod_playlist(renditions, ["a.m3u8", "b.m3u8"])
    assert playlist.count(',mp4a.40.2"') == 2  # HLS: CODECS names every format of the variant


@pytest.fixture(scope="module")
def published_with_sound(tmp_path_factory):
    """The compliance stage given a decoder's joined fMP4 with sound (256x256: large enough to watermark)."""
    audio = tone(9 * SAMPLE_RATE // 8)
    monkeypatch = pytest.MonkeyPatch()

    def decoder_output(frames: np.ndarray, fps: float) -> bytes:  # what the decoder stores as the job's video
        inits, segments, _ = encode_chunked(frames, audio, [1, 4, 4], fps)
        return join_segments(inits[0], segments)

    monkeypatch.setattr(compliance_stage_tests, "encode_mp4", decoder_output)
    try:
        tmp_path = tmp_path_factory.mktemp("compliance-audio")
        emitted, blobs, settings = compliance_stage_tests.run_stage(tmp_path, compliance_stage_tests.clip(256),
                                                                    job_id="job-a1")
    finally:
        monkeypatch.undo()
    [(topic, event)] = emitted
    assert topic == topics.PUBLISHED.name
    return event, blobs, settings


def test_compliance_keeps_the_sound_in_the_master_and_every_rendition(published_with_sound):
    event, blobs, settings = published_with_sound
    root = ensure_dev_chain(settings.var_dir / "c2pa").root_pem
    for media in (event["video"], *(rendition["media"] for rendition in event["renditions"])):
        data = blobs.get(media)
        assert verify_video(data, trust_anchors_pem=root).validation_state == "Trusted"
        assert probe_mp4(data)["audio"]["duration_s"] == pytest.approx(9 / 8, abs=1e-9)
        assert peak_hz(read_audio(data).waveform[2048:, 0]) == pytest.approx(TONE_HZ, abs=5)
    assert read_watermark(read_mp4(blobs.get(event["video"]))).payload == payload_for_job("job-a1")


def test_one_flipped_byte_of_the_sound_makes_the_signature_invalid(published_with_sound):
    event, blobs, settings = published_with_sound
    root = ensure_dev_chain(settings.var_dir / "c2pa").root_pem
    signed = bytearray(blobs.get(event["video"]))
    packet = audio_packets(bytes(signed))[3]
    mdat_offset, mdat_size = next((offset, size) for box, offset, size in top_level_boxes(bytes(signed))
                                  if box == b"mdat")
    assert mdat_offset < packet.pos < mdat_offset + mdat_size  # sound data, not metadata
    signed[packet.pos + packet.size // 2] ^= 0x01
    assert verify_video(bytes(signed), trust_anchors_pem=root).validation_state == "Invalid"


def test_verify_reports_the_audio_track(published_with_sound, tmp_path):
    event, blobs, settings = published_with_sound
    path = tmp_path / "with-sound.mp4"
    path.write_bytes(blobs.get(event["video"]))
    report = verify_file(str(path), look_up_job=False, settings=settings)
    assert report.provenance.trusted and report.watermark.payload == payload_for_job("job-a1")
    assert "audio: aac 24000 Hz 1 ch 1.125 s" in report.render().splitlines()

    path.write_bytes(encode_mp4(_gradient_clip(2, 32, 32), FPS))
    assert "audio: none" in verify_file(str(path), look_up_job=False, settings=settings).render().splitlines()
