"""The prompt-embedding cache: a prompt seen before skips the text encoder.

An entry is keyed by a hash of (encoder id, prompt, negative prompt, max sequence length) — everything the
embeddings depend on — and names the embedding blobs by reference, so a hit costs one small file read and no
tensor traffic: the PromptEncoded event simply points at blobs that already exist (and carry their sha256, which
the agent checks when it loads them). Entries live in the blob store, shared by every prompt-encoder process, with
a small in-process LRU in front. A hit whose blobs have gone missing is treated as a miss and rewritten.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from streams.blobs import LocalBlobStore

CACHE_DIR = "_cache"
ENTRY_NAME = "entry.json"


def cache_key(encoder_id: str, prompt: str, negative_prompt: str, max_sequence_length: int) -> str:
    material = json.dumps([encoder_id, prompt, negative_prompt, max_sequence_length], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedEmbeddings:
    prompt_embeds: dict  # BlobRef
    negative_prompt_embeds: dict | None  # BlobRef; None when the entry was made for a job without guidance
    made_for: str  # the job whose request filled the entry


class EmbeddingCache:
    def __init__(self, blobs: LocalBlobStore, memory_entries: int = 1024):
        self.blobs = blobs
        self.memory_entries = memory_entries
        self._recent: OrderedDict[str, CachedEmbeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _segments(self, key: str, name: str) -> tuple[str, ...]:
        return (CACHE_DIR, "text-embeddings", key[:2], key, name)

    def get(self, key: str, need_negative: bool) -> CachedEmbeddings | None:
        """The cached embeddings, or None on a miss (absent, or lacking the negative embeddings this job needs)."""
        entry = self.peek(key, need_negative)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def peek(self, key: str, need_negative: bool) -> CachedEmbeddings | None:
        """get() without counting a hit or miss (a batch checking what it must encode)."""
        entry = self._recent.get(key)
        if entry is None:
            entry = self._load(key)
        if entry is None or (need_negative and entry.negative_prompt_embeds is None):
            return None
        self._remember(key, entry)
        return entry

    def _load(self, key: str) -> CachedEmbeddings | None:
        raw = self.blobs.read(*self._segments(key, ENTRY_NAME))
        if raw is None:
            return None
        record = json.loads(raw)
        entry = CachedEmbeddings(record["prompt_embeds"], record.get("negative_prompt_embeds"), record["made_for"])
        # Checked once when an entry enters memory: a cache must never hand out a dangling reference.
        refs = [entry.prompt_embeds] + ([entry.negative_prompt_embeds] if entry.negative_prompt_embeds else [])
        if not all(self.blobs.local_path(ref).is_file() for ref in refs):
            return None
        return entry

    def put(self, key: str, made_for: str, prompt_embeds, negative_prompt_embeds=None) -> CachedEmbeddings:
        """Store the tensors and the entry naming them (the entry last, so a reader never sees half an entry)."""
        # Content-addressed: two processes caching the same prompt (batched differently, so perhaps not
        # bit-identical) each keep their own blob, and the entry that wins names one that exists.
        prompt_ref = self.blobs.put_tensor(prompt_embeds, *self._segments(key, "prompt_embeds.safetensors"),
                                           content_addressed=True)
        negative_ref = None
        if negative_prompt_embeds is not None:
            negative_ref = self.blobs.put_tensor(negative_prompt_embeds,
                                                 *self._segments(key, "negative_prompt_embeds.safetensors"),
                                                 content_addressed=True)
        entry = CachedEmbeddings(prompt_ref, negative_ref, made_for)
        record = {"prompt_embeds": prompt_ref, "negative_prompt_embeds": negative_ref, "made_for": made_for}
        self.blobs.put(json.dumps(record).encode("utf-8"), *self._segments(key, ENTRY_NAME))
        self._remember(key, entry)
        return entry

    def _remember(self, key: str, entry: CachedEmbeddings) -> None:
        self._recent[key] = entry
        self._recent.move_to_end(key)
        while len(self._recent) > self.memory_entries:
            self._recent.popitem(last=False)
