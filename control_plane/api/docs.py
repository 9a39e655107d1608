"""/docs: the OpenAPI document rendered as one readable, self-contained HTML page
(no CDN: the control plane may run where the internet is not reachable)."""

from __future__ import annotations

import html
import json
from typing import Any


def _schema_name(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else json.dumps(schema)


def render_docs(doc: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(doc['info']['title'])} API</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
        "padding:0 1rem;color:#222}code,pre{background:#f4f4f4;padding:.1rem .3rem}"
        "pre{padding:.6rem;overflow:auto}h3{margin-bottom:.2rem}.m{font-weight:700;"
        "display:inline-block;width:4.5rem}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}</style></head><body>",
        f"<h1>{html.escape(doc['info']['title'])} API {html.escape(doc['info']['version'])}</h1>",
        "<p>Every <code>/v1/</code> call needs <code>Authorization: Bearer &lt;key&gt;</code>. "
        "Errors are <code>application/problem+json</code> (RFC 9457). Lists take "
        "<code>?limit=&amp;cursor=</code> and return <code>next_cursor</code>. "
        "The machine-readable document is <a href='/openapi.json'>/openapi.json</a>.</p>",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            parts.append(
                f"<h3 id='{html.escape(op['operationId'])}'><span class='m'>{method.upper()}"
                f"</span><code>{html.escape(path)}</code></h3><p>{html.escape(op['summary'])}</p>"
            )
            params = op.get("parameters", [])
            if params:
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
                    f"<td>{'required' if p.get('required') else ''}</td></tr>"
                    for p in params
                )
                parts.append(
                    f"<table><tr><th>parameter</th><th>in</th><th></th></tr>{rows}</table>"
                )
            body = op.get("requestBody")
            if body:
                schema = body["content"]["application/json"]["schema"]
                parts.append(f"<p>Body: <a href='#schema-{_schema_name(schema)}'>"
                             f"{_schema_name(schema)}</a></p>")  # fmt: skip
            codes = ", ".join(op["responses"])
            parts.append(f"<p>Responses: {codes}</p>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        parts.append(
            f"<h3 id='schema-{html.escape(name)}'>{html.escape(name)}</h3>"
            f"<pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        )
    parts.append("</body></html>")
    return "".join(parts)
