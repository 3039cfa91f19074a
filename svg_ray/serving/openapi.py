"""The endpoint's OpenAPI document and its docs page (served from the app: no CDN assets).

``POST /v1/generate`` reads its body itself (``http.handle_generate``: strict types, 4xx JSON
naming the field), so FastAPI cannot infer the request schema from the route. It comes from the
pydantic ``GenerateRequest`` instead, with each field's meaning and the server's actual bounds
added (``request_schema``); the response models below document what ``http.generate_response``
and ``http.error_response`` return. ``DOCS_HTML`` renders /openapi.json with a few lines of
script, so the page works offline and behind any route prefix.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, Field

from svg_ray.serving.config import ServerConfig
from svg_ray.serving.playground import html_page
from svg_ray.serving.schema import MAX_SEED, GenerateRequest

FIELD_DOCS: dict[str, str] = {
    "labels": "Class index of each image (one image per entry); or give label and count.",
    "label": "Class index of every image, with count.",
    "count": "How many images of label (default 1).",
    "steps": "Integration steps (default: the server's).",
    "cfg_scale": "Classifier-free guidance weight; 1 = no guidance (default: the server's).",
    "cfg_interval": "[t_lo, t_hi] of the time range where guidance applies (t=0 noise, t=1 data).",
    "sampler": "ODE integrator (default: the server's).",
    "seed": "Seed of image 0; image i uses seed + i. Omitted: the server picks one and echoes it.",
    "format": "'json': base64 PNGs in JSON; 'png': one image/png (a grid for several images).",
}


class ErrorItem(BaseModel):
    """One thing wrong with a request."""

    field: str = Field(description="The offending field ('labels[3]', 'steps'; 'body': all).")
    message: str = Field(description="What is wrong with it.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body of the endpoint."""

    error: Literal["invalid_request", "unavailable", "internal_error"]
    errors: list[ErrorItem]


class Timing(BaseModel):
    """Where the time of a request went."""

    total_s: float = Field(description="Server time for the whole request.")
    sample_s: float = Field(description="ODE solver time of the batch holding the request.")
    decode_s: float = Field(description="Decoder time of that batch.")
    encode_s: float = Field(description="PNG encoding time of this request's images.")
    batch_requests: int = Field(description="Requests that shared the forward pass.")
    batch_images: int = Field(description="Images in that forward pass.")


class GenerateResponse(BaseModel):
    """The JSON answer of POST /v1/generate (format 'json')."""

    images: list[str] = Field(description="Base64 PNG per image, in request order.")
    media_type: Literal["image/png"]
    labels: list[int]
    seeds: list[int] = Field(description="Seed of each image (seed + i).")
    seed: int = Field(description="The request's seed (given or chosen): resend it to reproduce.")
    width: int
    height: int
    settings: dict[str, Any] = Field(description="The sampler settings used (defaults filled).")
    timing: Timing


def request_schema(server: ServerConfig | None = None) -> dict[str, Any]:
    """JSON schema of the request body with field docs and ``server``'s bounds."""
    server = server or ServerConfig()
    schema = copy.deepcopy(GenerateRequest.model_json_schema())
    bounds: dict[str, dict[str, Any]] = {
        "labels": {"minItems": 1, "maxItems": server.max_images_per_request},
        "count": {"minimum": 1, "maximum": server.max_images_per_request},
        "label": {"minimum": 0},
        "steps": {"minimum": 1, "maximum": server.max_steps},
        "cfg_scale": {"minimum": 0, "maximum": server.max_cfg_scale},
        "seed": {"minimum": 0, "maximum": MAX_SEED},
    }
    defaults = server.defaults
    server_default = {
        "steps": defaults.steps,
        "cfg_scale": defaults.cfg_scale,
        "cfg_interval": list(defaults.cfg_interval),
        "sampler": defaults.sampler,
    }
    for name, prop in schema.get("properties", {}).items():
        if name in FIELD_DOCS:
            prop["description"] = FIELD_DOCS[name]
        if name in server_default:
            prop["description"] = f"{prop.get('description', '')} Server default: " + str(
                server_default[name]
            )
        typed = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
        for branch in typed:
            branch.update(bounds.get(name, {}))
    schema["examples"] = [{"labels": [1, 2, 3], "seed": 7, "steps": 10}]
    return schema


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": GenerateResponse,
        "description": "Base64 PNGs in JSON, or (format 'png') one image/png with X-Seed, "
        "X-Images, X-Total-S, X-Sample-S, X-Decode-S and X-Batch-Requests headers.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    400: _error("Malformed JSON."),
    413: _error("Body larger than the server's max_body_bytes."),
    422: _error("A field is wrong: errors[] names each one."),
    500: _error("The sampler failed (the server log has the traceback)."),
    503: _error("Queues full or the replica restarted: retry after Retry-After seconds."),
}
"""``responses=`` of the POST /v1/generate route."""


def openapi_schema(app: Any, server: ServerConfig) -> dict[str, Any]:
    """``app``'s OpenAPI document with the generate request body (and ``server``'s bounds)."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=app.title,
        version=app.version,
        description="Class-conditional image generation with an SVG latent diffusion model. "
        "The playground is at /; model, defaults and limits at GET /v1/model.",
        routes=app.routes,
    )
    body = request_schema(server)
    defs = body.pop("$defs", {})
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs)
    components["GenerateRequest"] = body
    op = doc["paths"]["/v1/generate"]["post"]
    op["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}
        },
    }
    return _relink(doc)


def _relink(node: Any) -> Any:
    """Point pydantic's '#/$defs/X' references at '#/components/schemas/X'."""
    if isinstance(node, dict):
        return {
            k: (
                v.replace("#/$defs/", "#/components/schemas/")
                if k == "$ref" and isinstance(v, str)
                else _relink(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_relink(v) for v in node]
    return node


DOCS_HTML = html_page(
    "SVG sampler API",
    "64rem",
    """  h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
  .method { font-weight: bold; text-transform: uppercase; margin-right: .4rem; }
  table { border-collapse: collapse; margin: .5rem 0 1rem 0; }
  td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; vertical-align: top; }
  code, pre { background: #f4f4f4; padding: 0 .2rem; }
  .error { color: #b00; }
</style>
</head>
<body>
<h1 id="title">SVG sampler API</h1>
<p>The machine-readable document: <a href="openapi.json">openapi.json</a>.
The <a href="./">playground</a> calls the same endpoint.</p>
<div id="doc">loading openapi.json...</div>
<script>
"use strict";
const base = location.href.replace(/docs\\/?([?#].*)?$/, "");
const ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"};
const esc = (s) => String(s).replace(/[&<>]/g, (c) => ENTITIES[c]);
function resolve(doc, s) {
  while (s && s.$ref) s = doc.components.schemas[s.$ref.split("/").pop()];
  return s || {};
}
function typeOf(doc, s) {
  s = resolve(doc, s);
  if (s.anyOf) return s.anyOf.map((b) => typeOf(doc, b)).filter((t) => t !== "null").join(" | ");
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (s.type === "array") return (s.items ? typeOf(doc, s.items) : "number") + "[]";
  return s.type || s.title || "object";
}
function bounds(doc, s) {
  const out = [];
  for (const b of (resolve(doc, s).anyOf || [resolve(doc, s)])) {
    for (const k of ["minimum", "maximum", "minItems", "maxItems"]) {
      if (b[k] !== undefined) out.push(`${k} ${b[k]}`);
    }
  }
  return out.join(", ");
}
function table(doc, schema) {
  schema = resolve(doc, schema);
  const props = schema.properties || {};
  const req = new Set(schema.required || []);
  const rows = Object.entries(props).map(([name, p]) =>
    `<tr><td><code>${esc(name)}</code>${req.has(name) ? " *" : ""}</td>` +
    `<td>${esc(typeOf(doc, p))}</td><td>${esc(bounds(doc, p))}</td>` +
    `<td>${esc(p.description || resolve(doc, p).description || "")}</td></tr>`).join("");
  return `<table class="fields"><tr><th>field</th><th>type</th><th>bounds</th>` +
    `<th>meaning</th></tr>${rows}</table>`;
}
function render(doc) {
  document.getElementById("title").textContent = `${doc.info.title} API`;
  let html = `<p>${esc(doc.info.description || "")}</p>`;
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      html += `<h2 class="op"><span class="method">${esc(method)}</span>` +
        `<code>${esc(path)}</code></h2><p>${esc(op.summary || "")}` +
        `${op.description ? " " + esc(op.description) : ""}</p>`;
      const body = op.requestBody && op.requestBody.content["application/json"];
      if (body) {
        html += `<h3>Request body (application/json)</h3>${table(doc, body.schema)}`;
        const ex = resolve(doc, body.schema).examples;
        if (ex) html += `<p>Example: <code>${esc(JSON.stringify(ex[0]))}</code></p>`;
      }
      for (const [code, r] of Object.entries(op.responses || {})) {
        html += `<h3>${esc(code)}: ${esc(r.description || "")}</h3>`;
        const json = r.content && r.content["application/json"];
        if (json && json.schema && resolve(doc, json.schema).properties) {
          html += table(doc, json.schema);
        }
      }
    }
  }
  document.getElementById("doc").innerHTML = html;
}
fetch(new URL("openapi.json", base)).then((r) => r.json()).then(render).catch((e) => {
  const d = document.getElementById("doc"); d.className = "error"; d.textContent = String(e);
});
</script>
</body>
</html>
""",
)
"""The page at /docs: renders /openapi.json (request fields, bounds, responses) offline."""
