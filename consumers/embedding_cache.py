"""The prompt-embedding cache: a prompt seen before skips the text encoder.

An entry is keyed by a hash of (encoder id, prompt, negative prompt, max sequence length) — everything the
embeddings depend on — and names the embedding blobs by reference, so a hit costs one small file read and no
tensor traffic: the PromptEncoded event simply points at blobs that already exist (and carry their sha256, which
the agent checks when it loads them). Entries live in the blob store, shared by every prompt-encoder process, with
a small in-process LRU in front. A hit whose blobs have gone missing is treated as a miss and rewritten.

Entries expire: the lifecycle stage (consumers/lifecycle.py) deletes an entry whose entry.json was last written
longer ago than its ``embeddings`` window. So that an entry in use never does, serving one whose entry.json is older
than half the window rewrites it (``expires_after_s``): an entry served at all is at most half a window from its
last renewal, and a job that got it keeps it for at least half a window.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable

from streams.blobs import BlobStore

CACHE_DIR = "_cache"
TEXT_EMBEDDINGS = "text-embeddings"
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
    def __init__(self, blobs: BlobStore, memory_entries: int = 1024, expires_after_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.blobs = blobs
        self.memory_entries = memory_entries
        self._recent: OrderedDict[str, CachedEmbeddings] = OrderedDict()
        #: key → when its entry.json was written (epoch s), for the entries in memory; renewal needs it
        self._written: dict[str, float] = {}
        self.renew_after_s = None if expires_after_s is None else expires_after_s / 2
        self.clock = clock
        self.hits = 0
        self.misses = 0

    def _segments(self, key: str, name: str) -> tuple[str, ...]:
        return (CACHE_DIR, TEXT_EMBEDDINGS, key[:2], key, name)

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
        if not self._renewed(key, entry):
            self._forget(key)
            return None
        self._remember(key, entry)
        return entry

    def _renewed(self, key: str, entry: CachedEmbeddings) -> bool:
        """Rewrite the entry when it is older than half its window (module docstring); False when it cannot be
        served any more (the lifecycle deleted it meanwhile)."""
        if self.renew_after_s is None:
            return True
        written = self._written.get(key)
        if written is None:  # new in memory: when was it written?
            stat = self.blobs.stat(self.blobs.key(*self._segments(key, ENTRY_NAME)))
            if stat is None:
                return False
            written = stat.modified
        if self.clock() - written > self.renew_after_s:
            if not self._blobs_exist(entry):
                return False
            self._write_entry(key, entry)
            written = self.clock()
        self._written[key] = written
        return True

    def _blobs_exist(self, entry: CachedEmbeddings) -> bool:
        refs = [entry.prompt_embeds] + ([entry.negative_prompt_embeds] if entry.negative_prompt_embeds else [])
        return all(self.blobs.stat(self.blobs.key_of(ref["uri"])) is not None for ref in refs)

    def _write_entry(self, key: str, entry: CachedEmbeddings) -> None:
        self.blobs.put(json.dumps(asdict(entry)).encode("utf-8"), *self._segments(key, ENTRY_NAME))

    def _load(self, key: str) -> CachedEmbeddings | None:
        raw = self.blobs.read(*self._segments(key, ENTRY_NAME))
        if raw is None:
            return None
        record = json.loads(raw)
        entry = CachedEmbeddings(record["prompt_embeds"], record.get("negative_prompt_embeds"), record["made_for"])
        # Checked once when an entry enters memory: a cache must never hand out a dangling reference.
        return entry if self._blobs_exist(entry) else None

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
        self._write_entry(key, entry)
        self._written[key] = self.clock()
        self._remember(key, entry)
        return entry

    def _remember(self, key: str, entry: CachedEmbeddings) -> None:
        self._recent[key] = entry
        self._recent.move_to_end(key)
        while len(self._recent) > self.memory_entries:
            self._forget(next(iter(self._recent)))

    def _forget(self, key: str) -> None:
        self._recent.pop(key, None)
        self._written.pop(key, None)
