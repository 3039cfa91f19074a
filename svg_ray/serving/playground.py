"""The playground page served at ``/``: one self-contained HTML file, no external assets.

It reads GET v1/model for the class names and defaults, posts to v1/generate with
``format: "png"`` and shows the returned grid with the round-trip and server timings. URLs are
relative to the page, so it works under any route_prefix.
"""


def html_page(title: str, max_width: str, rest: str) -> str:
    """A self-contained HTML page (no external assets): the common head and body style, then
    ``rest`` (more CSS rules, ``</style>``, and the page's body)."""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>\n"
        "  body { font-family: system-ui, sans-serif; margin: 1.5rem; "
        f"max-width: {max_width}; color: #222; }}\n" + rest
    )


PLAYGROUND_HTML = html_page(
    "SVG sampler playground",
    "60rem",
    """  fieldset { border: 1px solid #ccc; margin: 0 0 1rem 0; }
  label { margin-right: 1rem; white-space: nowrap; }
  input[type=number] { width: 5rem; }
  #classes label { display: inline-block; min-width: 8rem; }
  #result { image-rendering: pixelated; min-width: 256px; border: 1px solid #ddd; }
  #status { margin: .5rem 0; min-height: 1.2em; }
  .error { color: #b00; }
  code { background: #f4f4f4; padding: 0 .2rem; }
</style>
</head>
<body>
<h1>SVG sampler</h1>
<p id="model">loading model info...</p>
<p>API: <a id="api-docs" href="docs">reference</a> (<a href="openapi.json">openapi.json</a>):
<code>POST v1/generate</code>, <code>GET v1/model</code>.</p>
<form id="form" onsubmit="return false">
  <fieldset><legend>Classes</legend><div id="classes"></div></fieldset>
  <fieldset><legend>Sampler</legend>
    <label>images per class <input id="count" type="number" min="1" value="2"></label>
    <label>steps <input id="steps" type="number" min="1"></label>
    <label>CFG scale <input id="cfg_scale" type="number" min="0" step="0.5"></label>
    <label>CFG from t <input id="cfg_lo" type="number" min="0" max="1" step="0.05"></label>
    <label>to t <input id="cfg_hi" type="number" min="0" max="1" step="0.05"></label>
    <label>sampler <select id="sampler"><option>euler</option><option>heun</option></select>
    </label>
    <label>seed <input id="seed" type="number" min="0" value="0"></label>
  </fieldset>
  <button id="generate" type="button">Generate</button>
</form>
<div id="status"></div>
<img id="result" alt="generated images">
<script>
"use strict";
const base = location.href.endsWith("/") ? location.href : location.href + "/";
const api = (p) => new URL(p, base).toString();
const $ = (id) => document.getElementById(id);
let limits = {max_images_per_request: 16};

async function loadModel() {
  const r = await fetch(api("v1/model"));
  const m = await r.json();
  limits = m.limits;
  const d = m.defaults;
  $("steps").value = d.steps; $("steps").max = m.limits.max_steps;
  $("cfg_scale").value = d.cfg_scale; $("cfg_scale").max = m.limits.max_cfg_scale;
  $("cfg_lo").value = d.cfg_interval[0]; $("cfg_hi").value = d.cfg_interval[1];
  $("sampler").value = d.sampler;
  $("model").textContent = `DiT ${m.dit.size} (${(m.dit.params / 1e6).toFixed(2)}M params), ` +
    `step ${m.step}, ${m.image_size[0]}px, ${m.num_classes} classes, on ${m.device}; ` +
    `model ${m.model_uri}`;
  const box = $("classes");
  for (let i = 0; i < m.num_classes; i++) {
    const name = m.classes[i] !== undefined ? m.classes[i] : String(i);
    const l = document.createElement("label");
    const c = document.createElement("input");
    c.type = "checkbox"; c.value = String(i); c.checked = i < 4; c.className = "cls";
    l.appendChild(c); l.appendChild(document.createTextNode(` ${i}: ${name}`));
    box.appendChild(l);
  }
}

async function generate() {
  const classes = [...document.querySelectorAll(".cls:checked")].map((c) => Number(c.value));
  const count = Number($("count").value);
  const labels = classes.flatMap((c) => Array(count).fill(c));
  const body = {
    labels, steps: Number($("steps").value), cfg_scale: Number($("cfg_scale").value),
    cfg_interval: [Number($("cfg_lo").value), Number($("cfg_hi").value)],
    sampler: $("sampler").value, seed: Number($("seed").value), format: "png",
  };
  $("status").className = ""; $("status").textContent = "generating...";
  $("generate").disabled = true;
  const t0 = performance.now();
  try {
    const r = await fetch(api("v1/generate"), {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    if (!r.ok) {
      const e = await r.json();
      const msg = (e.errors || []).map((x) => `${x.field}: ${x.message}`).join("; ");
      throw new Error(`HTTP ${r.status}: ${msg || e.error}`);
    }
    const blob = await r.blob();
    const ms = performance.now() - t0;
    const img = $("result");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    $("status").textContent = `${labels.length} images in ${ms.toFixed(0)} ms ` +
      `(server ${Number(r.headers.get("X-Total-S")).toFixed(3)} s: ` +
      `sampler ${r.headers.get("X-Sample-S")} s, decoder ${r.headers.get("X-Decode-S")} s, ` +
      `batched with ${r.headers.get("X-Batch-Requests")} request(s)); ` +
      `seed ${r.headers.get("X-Seed")}`;
  } catch (err) {
    $("status").className = "error"; $("status").textContent = String(err.message || err);
  } finally {
    $("generate").disabled = false;
  }
}

$("generate").addEventListener("click", generate);
loadModel().catch((e) => { $("model").className = "error"; $("model").textContent = String(e); });
</script>
</body>
</html>
""",
)
