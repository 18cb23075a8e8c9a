"""Exchange families: which body kinds belong to which family (and so to which RPC)."""

from __future__ import annotations

from typing import Final

# Body field of liandong.v1.Message -> family. A family is what the registry permits
# and what one Exchange RPC carries.
BODY_FAMILIES: Final[dict[str, str]] = {
    "clue": "clue",
    "crime_transfer": "crime_transfer",
    "notice": "notice",
    "evidence_request": "evidence_request",
    "recommendation": "recommendation",
    "evidence_response": "reply",
    "recommendation_reply": "reply",
    "feedback": "reply",
}

FAMILY_BODIES: Final[dict[str, tuple[str, ...]]] = {}
for _body, _family in BODY_FAMILIES.items():
    FAMILY_BODIES.setdefault(_family, ())
    FAMILY_BODIES[_family] += (_body,)

# CLI spelling (`liandong send crime-transfer`) -> family.
CLI_FAMILIES: Final[dict[str, str]] = {name.replace("_", "-"): name for name in FAMILY_BODIES}


def default_body_type(family: str) -> str:
    bodies = FAMILY_BODIES[family]
    return bodies[0] if len(bodies) == 1 else ""
