"""What a split's manifest states over all its scenes (schema 2): the member set when every scene
has the same one (else null), the smallest and largest view count, the image format and the render
range when the scenes share one (else null). Each shard record carries its scenes' statistics;
finalising a split merges them."""
from __future__ import annotations

from typing import Any


def new_stats() -> dict[str, Any]:
    return {'members': [], 'min_views': None, 'max_views': None, 'image_formats': [],
            'near_far': []}


def add_scene(stats: dict[str, Any], members: list[str], meta: dict[str, Any]) -> None:
    """Count one scene (its member names and ``meta.json`` dict) into a shard's ``stats``."""
    merge(stats, {'members': [members], 'min_views': meta['num_views'],
                  'max_views': meta['num_views'], 'image_formats': [meta['image_format']],
                  'near_far': [[meta['near'], meta['far']]]})


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Merge ``other``'s statistics into ``into`` (distinct values kept in first-seen order)."""
    for k in ('members', 'image_formats', 'near_far'):
        into[k] += [x for x in other[k] if x not in into[k]]
    for k, pick in (('min_views', min), ('max_views', max)):
        if other[k] is not None:
            into[k] = other[k] if into[k] is None else pick(into[k], other[k])
    return into


def manifest_fields(stats: dict[str, Any], planned_members: list[str] | None) -> dict[str, Any]:
    """The manifest keys of a split from its merged ``stats``; ``planned_members`` is the member
    set a source declares for every scene (SRT's sets), None where scenes may differ."""
    members = planned_members
    if members is None:  # the scenes' own member set, when they all share one
        members = stats['members'][0] if len(stats['members']) == 1 else None
    near, far = stats['near_far'][0] if len(stats['near_far']) == 1 else (None, None)
    return {'members': members, 'min_views': stats['min_views'], 'max_views': stats['max_views'],
            'image_format': stats['image_formats'][0] if len(stats['image_formats']) == 1 else None,
            'near': near, 'far': far}
