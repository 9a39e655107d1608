"""Stripe's form encoding: `a[b][0][c]=v` → {"a": {"b": [{"c": "v"}]}}."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

_PART = re.compile(r"\[([^\]]*)\]")


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        converted = {k: _listify(v) for k, v in node.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return node


def decode(body: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        head = key.split("[", 1)[0]
        parts = [head, *_PART.findall(key[len(head) :])]
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # `expand[]=x`: append
                part = str(len(node))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    result: dict[str, Any] = _listify(root)
    return result
