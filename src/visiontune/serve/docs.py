"""`/docs`: the OpenAPI schema as a readable page, rendered on the server.

FastAPI's own Swagger and ReDoc pages load their scripts from a CDN, so they are blank on a machine without
internet; this page needs nothing but the schema, and `/openapi.json` stays the machine-readable source.
"""

from __future__ import annotations

import html
import json

STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#1b1f24}
code,pre{font:13px ui-monospace,monospace}pre{background:#f3f4f7;padding:8px;border-radius:6px;overflow:auto}
section{border:1px solid #dde1e6;border-radius:8px;padding:0 1em;margin:1em 0}
.m{font-weight:700;color:#fff;background:#2f6fd6;border-radius:4px;padding:1px 6px;margin-right:6px}
.get{background:#2e8b57}td,th{text-align:left;padding:2px 10px 2px 0;vertical-align:top}"""


def _parameters(op: dict) -> str:
    rows = [f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{html.escape(p.get('in', ''))}</td>"
            f"<td>{html.escape(p.get('description', '') or '')}</td></tr>" for p in op.get("parameters", [])]
    return f"<table><tr><th>parameter</th><th>in</th><th></th></tr>{''.join(rows)}</table>" if rows else ""


def _body(op: dict) -> str:
    content = op.get("requestBody", {}).get("content", {})
    return (f"<p>Body: {', '.join(f'<code>{html.escape(kind)}</code>' for kind in content)}</p>" if content else "")


def _responses(op: dict) -> str:
    rows = [f"<tr><td><code>{html.escape(code)}</code></td><td>{html.escape(r.get('description', ''))}</td></tr>"
            for code, r in op.get("responses", {}).items()]
    return f"<table><tr><th>status</th><th></th></tr>{''.join(rows)}</table>"


def render(schema: dict) -> str:
    info = schema.get("info", {})
    sections = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            sections.append(
                f"<section><h3><span class='m {method}'>{method.upper()}</span><code>{html.escape(path)}</code></h3>"
                f"<p>{html.escape(op.get('summary', ''))}</p>{_parameters(op)}{_body(op)}{_responses(op)}</section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(info.get('title', 'API'))} API</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(info.get('title', ''))} {html.escape(info.get('version', ''))}</h1>"
            f"<p>{html.escape(info.get('description', ''))}</p>"
            f"<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>{''.join(sections)}"
            f"<details><summary>Schema</summary><pre>{html.escape(json.dumps(schema, indent=2))}</pre></details>"
            "</body></html>")
