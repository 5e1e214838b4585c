"""Pre-generation prompt safety — a placeholder until the policy engine lands (issue 6).

A plain function with no Kafka: a short list of terms that block a request outright. It exists so the pipeline's
PRE_GEN flag path is real end to end; it is not a safety policy and catches nothing it is not told.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

POLICY_VERSION = "placeholder-0"
BLOCKED_TERMS = {
    "csam": "SEXUAL_MINORS",
    "child sexual": "SEXUAL_MINORS",
    "non-consensual intimate": "NCII",
    "beheading": "VIOLENT_EXTREMISM",
}


@dataclass
class PromptDecision:
    action: str  # ALLOW | BLOCK
    reasons: list[str] = field(default_factory=list)
    evidence: str = ""
    policy_version: str = POLICY_VERSION


def evaluate_prompt(prompt: str) -> PromptDecision:
    normalised = re.sub(r"\s+", " ", prompt.casefold())
    hits = [(term, reason) for term, reason in BLOCKED_TERMS.items() if term in normalised]
    if not hits:
        return PromptDecision("ALLOW")
    return PromptDecision(
        "BLOCK",
        reasons=sorted({reason for _, reason in hits}),
        evidence="matched: " + ", ".join(term for term, _ in hits),
    )
