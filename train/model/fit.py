"""Whether a set of tensors fits what a model expects, said once for every loader of weights (the
HF decoder reader, the tower reader, the trainer's initial state): the tensors of the wrong shape
(found and expected), the missing and the unexpected names, each list cut at `most`."""

from __future__ import annotations


def misfit_message(header: str, *, wrong: list[str], missing: list[str], unexpected: list[str],
                   most: int = 8) -> str | None:
    """None when every list is empty; else `header` then one line per problem kind, e.g.
    "  decoder.norm.weight: found [65], expected [64]", "  missing (2): [...]"."""
    if not (wrong or missing or unexpected):
        return None
    lines = [header] + [f"  {w}" for w in wrong[:most]]
    if len(wrong) > most:
        lines.append(f"  ... and {len(wrong) - most} more of another shape")
    if missing:
        lines.append(f"  missing ({len(missing)}): {missing[:most]}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:most]}")
    return "\n".join(lines)
