"""`columnformer report RUN_DIR`: one self-contained HTML page per run.

No network and no external assets: CSS and JS are inline, figures are base64 PNGs, learning curves
inline SVG. The page holds the config, learning curves (metrics.jsonl), the analysis figures and
numbers (analysis.json; ``analyze`` runs first when it is missing) and an interactive **sheet
explorer**:

* ``svg#sheet`` draws the sheet in its geometry (grids as-is, stacked layers side by side, spheres as
  an equirectangular lon/lat map), one ``rect`` per column with ``data-col=i``;
* ``input#step-slider`` (value 1..T) picks the recurrent step;
* clicking a column fills ``div#panel`` (attributes ``data-col``, ``data-step`` = slider value) with its
  selectivity (``table#selectivity``, rows ``data-class``/``data-dprime``) and its strongest incoming
  connections at that step (``ol#incoming``, items ``data-src``/``data-weight``), which are also
  coloured by weight on the sheet; ``window.columnformerExplorer.select(i)`` does the same from code;
* ``body[data-ready="1"]`` once the embedded data is decoded.

Only the top-M incoming connections per column per step are embedded (default M = 16), as
zlib-compressed byte planes (source offsets int32, weights float16) decoded in the page with the
browser's ``DecompressionStream``, so a 65,536-column sheet still gives a page of modest size.
"""

from __future__ import annotations

import base64
import html
import json
import zlib

_LEVEL = 6  # zlib level: 9 was ~10x slower for a ~1% smaller page (65,536-column sheet)
from pathlib import Path

import numpy as np
import yaml

from .layout import Layout, sheet_layout


# ---------------------------------------------------------------------- embedding
def _blob(arr: np.ndarray, dtype: str) -> dict:
    """Array -> {dtype, itemsize, shape, b64}: little-endian bytes split into byte planes, zlib, base64."""
    a = np.ascontiguousarray(np.asarray(arr).astype(np.dtype(dtype).newbyteorder("<")))
    size = a.dtype.itemsize
    planes = a.view(np.uint8).reshape(-1, size).T.copy()
    data = base64.b64encode(zlib.compress(planes.tobytes(), _LEVEL)).decode("ascii")
    return {"dtype": dtype, "itemsize": size, "shape": list(a.shape), "b64": data}


def explorer_payload(
    layout: Layout,
    top_src: np.ndarray,
    top_weight: np.ndarray,
    dprime: np.ndarray | None = None,
    column_wiring: np.ndarray | None = None,
    m: int | None = None,
) -> dict:
    """The data of the sheet explorer (JSON-ready, binary arrays compressed).

    ``top_src``/``top_weight`` (T, N, M) strongest incoming edges per column per step (src -1: none),
    ``dprime`` (K, N) selectivity, ``column_wiring`` (T, N) per-column wiring length. Only the first
    ``m`` edges per column are kept (``None``: all M given).
    """
    top_src = np.asarray(top_src)
    top_weight = np.asarray(top_weight, dtype=np.float32)
    if m is not None:
        top_src, top_weight = top_src[..., :m], top_weight[..., :m]
    T, N, M = top_src.shape
    if layout.xy.shape[0] != N:
        raise ValueError(f"layout has {layout.xy.shape[0]} columns but the edges describe {N}")
    cols = np.arange(N, dtype=np.int64)[None, :, None]
    offset = np.where(top_src >= 0, top_src - cols, np.iinfo(np.int32).min).astype(np.int32)  # small for local wiring
    arrays = {
        "xy": _blob(layout.xy.astype(np.float32), "float32"),
        "panel": _blob(layout.panel.astype(np.uint16), "uint16"),
        "src_offset": _blob(offset, "int32"),
        "weight": _blob(top_weight, "float16"),
    }
    K = 0
    if dprime is not None:
        d = np.nan_to_num(np.asarray(dprime, dtype=np.float32), nan=0.0)
        K = d.shape[0]
        arrays["dprime"] = _blob(d, "float16")
    if column_wiring is not None:
        arrays["wiring"] = _blob(np.asarray(column_wiring, dtype=np.float32), "float16")
    return {
        "n": int(N),
        "steps": int(T),
        "m": int(M),
        "classes": int(K),
        "cell": float(layout.cell),
        "panels": layout.panel_names,
        "panel_boxes": [list(map(float, b)) for b in layout.panel_boxes],
        "projection": layout.projection,
        "arrays": arrays,
    }


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 24px}
h1{font-size:22px;margin:8px 0} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table.num{border-collapse:collapse;font-size:13px} table.num td,table.num th{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.num th{background:#f0f0f0} table.num td:first-child,table.num th:first-child{text-align:left}
pre{background:#f4f4f4;padding:8px;overflow:auto;max-height:420px;font-size:12px}
img.fig{max-width:100%;border:1px solid #eee;margin:6px 0;background:#fff}
#explorer{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
#sheet-wrap{flex:1 1 640px;min-width:320px;background:#fff;border:1px solid #ddd}
#sheet{width:100%;height:auto;display:block;cursor:crosshair}
#sheet rect.sel{stroke:#0057ff;stroke-width:var(--sw)}
#panel{flex:0 0 330px;background:#fff;border:1px solid #ddd;padding:8px 12px;font-size:13px;min-height:200px}
#panel ol{padding-left:22px;margin:4px 0} #panel li{margin:1px 0}
#panel .sw{display:inline-block;width:10px;height:10px;border:1px solid #999;margin-right:4px;vertical-align:middle}
.controls{margin:8px 0;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
.muted{color:#777}
"""

_JS = r"""
(function(){
'use strict';
const D = JSON.parse(document.getElementById('explorer-data').textContent);
const N = D.n, T = D.steps, M = D.m, K = D.classes;
const SVGNS = 'http://www.w3.org/2000/svg';
function b64bytes(s){const bin=atob(s);const out=new Uint8Array(bin.length);for(let i=0;i<bin.length;i++)out[i]=bin.charCodeAt(i);return out;}
async function inflate(bytes){
  const stream=new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
function unplane(bytes,size){const n=bytes.length/size;const out=new Uint8Array(bytes.length);
  for(let p=0;p<size;p++){const o=p*n;for(let i=0;i<n;i++)out[i*size+p]=bytes[o+i];}return out.buffer;}
function half(u){const out=new Float32Array(u.length);for(let i=0;i<u.length;i++){const h=u[i],s=(h&0x8000)?-1:1,e=(h>>10)&31,f=h&1023;
  out[i]=e===0?s*Math.pow(2,-14)*(f/1024):(e===31?(f?NaN:s*Infinity):s*Math.pow(2,e-15)*(1+f/1024));}return out;}
async function decode(spec){const buf=unplane(await inflate(b64bytes(spec.b64)),spec.itemsize);
  switch(spec.dtype){case 'int32':return new Int32Array(buf);case 'float32':return new Float32Array(buf);
  case 'uint16':return new Uint16Array(buf);case 'float16':return half(new Uint16Array(buf));case 'uint8':return new Uint8Array(buf);}
  throw new Error('dtype '+spec.dtype);}
const stops=[[255,247,236],[253,212,158],[252,141,89],[215,48,31],[127,0,0]];
function ramp(x){x=Math.max(0,Math.min(1,x));const p=x*(stops.length-1),i=Math.min(Math.floor(p),stops.length-2),f=p-i;
  const c=stops[i].map((v,k)=>Math.round(v+(stops[i+1][k]-v)*f));return 'rgb('+c.join(',')+')';}
const vir=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function viridis(x){x=Math.max(0,Math.min(1,x));const p=x*(vir.length-1),i=Math.min(Math.floor(p),vir.length-2),f=p-i;
  const c=vir[i].map((v,k)=>Math.round(v+(vir[i+1][k]-v)*f));return 'rgb('+c.join(',')+')';}
const tab10=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f','#bcbd22','#17becf'];
let A={}, rects=[], selected=-1;
const slider=document.getElementById('step-slider'), label=document.getElementById('step-label');
const panel=document.getElementById('panel'), mode=document.getElementById('colour-mode');
const svg=document.getElementById('sheet');
function step(){return parseInt(slider.value,10);}
function baseColours(){
  const t=step()-1, m=mode.value;
  let vals=null;
  if(m==='wiring'&&A.wiring){vals=A.wiring.subarray(t*N,(t+1)*N);}
  if(m==='maxd'&&A.dprime){vals=new Float32Array(N);for(let i=0;i<N;i++){let b=-Infinity;for(let k=0;k<K;k++)b=Math.max(b,A.dprime[k*N+i]);vals[i]=b;}}
  if(m==='pref'&&A.dprime){for(let i=0;i<N;i++){let b=-Infinity,bk=0;for(let k=0;k<K;k++){const v=A.dprime[k*N+i];if(v>b){b=v;bk=k;}}rects[i].setAttribute('fill',tab10[bk%10]);}return;}
  if(!vals){for(let i=0;i<N;i++)rects[i].setAttribute('fill','#cfd8dc');return;}
  let lo=Infinity,hi=-Infinity;for(let i=0;i<N;i++){if(isFinite(vals[i])){lo=Math.min(lo,vals[i]);hi=Math.max(hi,vals[i]);}}
  const span=(hi-lo)||1;for(let i=0;i<N;i++)rects[i].setAttribute('fill',viridis((vals[i]-lo)/span));
}
function incoming(i,t){const out=[];const base=(t*N+i)*M;
  for(let r=0;r<M;r++){const off=A.src_offset[base+r];if(off===-2147483648)continue;out.push([i+off,A.weight[base+r]]);}return out;}
let lit=[], greyed=false;
function render(){
  label.textContent='step '+step()+' / '+T;
  const prev=lit;lit=[];for(const j of prev)rects[j].classList.remove('src');
  if(selected<0){greyed=false;baseColours();return;}
  const t=step()-1, inc=incoming(selected,t);
  if(!greyed){for(let i=0;i<N;i++)rects[i].setAttribute('fill','#e3e3e3');greyed=true;}
  else{for(const j of prev)rects[j].setAttribute('fill','#e3e3e3');}
  const wmax=inc.length?inc[0][1]:1;
  for(const [j,w] of inc){rects[j].setAttribute('fill',ramp(w/(wmax||1)));rects[j].classList.add('src');lit.push(j);}
  for(const r of svg.querySelectorAll('rect.sel'))r.classList.remove('sel');
  rects[selected].classList.add('sel');
  let h='<h3 style="margin:4px 0">column '+selected+' <span class="muted">· '+esc(D.panels[A.panel[selected]]||'')+' · step '+step()+'</span></h3>';
  if(K){let b=-Infinity,bk=0;for(let k=0;k<K;k++){const v=A.dprime[k*N+selected];if(v>b){b=v;bk=k;}}
    h+='<p>preferred class <b>'+bk+'</b>, d′ = '+b.toFixed(2)+'</p><table id="selectivity" class="num"><tr><th>class</th><th>d′</th></tr>';
    for(let k=0;k<K;k++){const v=A.dprime[k*N+selected];h+='<tr data-class="'+k+'" data-dprime="'+v+'"><td>'+k+'</td><td>'+v.toFixed(3)+'</td></tr>';}
    h+='</table>';}
  h+='<h4 style="margin:8px 0 2px">strongest incoming connections ('+inc.length+')</h4><ol id="incoming">';
  for(const [j,w] of inc){h+='<li data-src="'+j+'" data-weight="'+w+'"><span class="sw" style="background:'+ramp(w/(wmax||1))+'"></span>column '+j+
     ' <span class="muted">('+esc(D.panels[A.panel[j]]||'')+')</span> — '+w.toPrecision(4)+'</li>';}
  h+='</ol>';
  panel.innerHTML=h;panel.dataset.col=String(selected);panel.dataset.step=String(step());
}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function select(i){selected=i;render();}
async function init(){
  for(const [k,spec] of Object.entries(D.arrays))A[k]=await decode(spec);
  let x0=Infinity,y0=Infinity,x1=-Infinity,y1=-Infinity;const c=D.cell;
  for(let i=0;i<N;i++){const x=A.xy[2*i],y=A.xy[2*i+1];x0=Math.min(x0,x);y0=Math.min(y0,y);x1=Math.max(x1,x);y1=Math.max(y1,y);}
  const pad=c;svg.setAttribute('viewBox',[x0-pad,y0-pad-c,(x1-x0)+2*pad,(y1-y0)+2*pad+c].join(' '));
  svg.style.setProperty('--sw',String(c*0.18));
  const frag=document.createDocumentFragment();
  D.panels.forEach((name,p)=>{const b=D.panel_boxes[p];if(!b)return;const tx=document.createElementNS(SVGNS,'text');
    tx.setAttribute('x',b[0]);tx.setAttribute('y',(D.projection==='equirectangular'?y0:b[1])-c*0.4);tx.setAttribute('font-size',c*0.5);
    tx.setAttribute('fill','#555');tx.textContent=name;frag.appendChild(tx);});
  const s=c*0.92;
  for(let i=0;i<N;i++){const r=document.createElementNS(SVGNS,'rect');r.setAttribute('x',A.xy[2*i]-s/2);r.setAttribute('y',A.xy[2*i+1]-s/2);
    r.setAttribute('width',s);r.setAttribute('height',s);r.setAttribute('data-col',i);rects.push(r);frag.appendChild(r);}
  svg.appendChild(frag);
  svg.addEventListener('click',e=>{const r=e.target.closest('[data-col]');if(r)select(parseInt(r.getAttribute('data-col'),10));});
  slider.addEventListener('input',render);slider.addEventListener('change',render);mode.addEventListener('change',()=>{greyed=false;if(selected>=0){selected=-1;panel.innerHTML='<p class="muted">click a column</p>';delete panel.dataset.col;}render();});
  document.getElementById('clear-sel').addEventListener('click',()=>{selected=-1;for(const r of svg.querySelectorAll('rect.sel'))r.classList.remove('sel');panel.innerHTML='<p class="muted">click a column</p>';delete panel.dataset.col;render();});
  render();
  window.columnformerExplorer={select,render,incoming:(i,s)=>incoming(i,s-1),n:N,steps:T,m:M};
  document.body.dataset.ready='1';
}
init().catch(err=>{panel.innerHTML='<p style="color:#b00">explorer failed: '+esc(err.message)+' (needs a browser with DecompressionStream)</p>';document.body.dataset.ready='error';});
})();
"""


def explorer_html(payload: dict) -> str:
    """The explorer section: controls, ``svg#sheet``, ``div#panel`` and the embedded data + script."""
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    modes = []
    if "dprime" in payload["arrays"]:
        modes += [("maxd", "max d′ (selectivity)"), ("pref", "preferred class")]
    if "wiring" in payload["arrays"]:
        modes.append(("wiring", "wiring length Σ A·d at this step"))
    modes.append(("none", "plain"))
    options = "".join(f'<option value="{v}">{html.escape(t)}</option>' for v, t in modes)
    T = payload["steps"]
    return f"""
<div class="controls">
  <label>recurrent step <input type="range" id="step-slider" min="1" max="{T}" step="1" value="{T}"></label>
  <span id="step-label">step {T} / {T}</span>
  <label>colour columns by <select id="colour-mode">{options}</select></label>
  <button id="clear-sel" type="button">clear selection</button>
  <span class="muted">{payload['n']:,} columns · top {payload['m']} incoming connections per column per step embedded</span>
</div>
<div id="explorer">
  <div id="sheet-wrap"><svg id="sheet" xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet"></svg></div>
  <div id="panel"><p class="muted">click a column to see its incoming connections (coloured by weight) and its selectivity</p></div>
</div>
<script type="application/json" id="explorer-data">{data}</script>
<script>{_JS}</script>
"""


# ---------------------------------------------------------------------- page pieces
def _svg_chart(series: list[tuple[str, list[float], list[float], str]], title: str, ylog: bool = False,
               width: int = 520, height: int = 260) -> str:
    """A minimal inline SVG line chart: series of (label, x, y, colour)."""
    pts = [(x, y) for _, xs, ys, _ in series for x, y in zip(xs, ys) if y is not None and np.isfinite(y) and (not ylog or y > 0)]
    if not pts:
        return f"<p class='muted'>{html.escape(title)}: no data</p>"
    tf = (lambda v: np.log10(v)) if ylog else (lambda v: v)
    xs = [p[0] for p in pts]
    ys = [tf(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    L, R, Tm, B = 52, 12, 24, 30
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
    sy = lambda y: height - B - (tf(y) - y0) / (y1 - y0) * (height - Tm - B)  # noqa: E731
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#999"/>',
           f'<line x1="{L}" y1="{Tm}" x2="{L}" y2="{height - B}" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        yv = y0 + frac * (y1 - y0)
        lab = 10**yv if ylog else yv
        yy = height - B - frac * (height - Tm - B)
        out.append(f'<text x="{L - 4}" y="{yy + 4}" text-anchor="end" font-size="10">{lab:.3g}</text>')
        xv = x0 + frac * (x1 - x0)
        out.append(f'<text x="{sx(xv)}" y="{height - B + 14}" text-anchor="middle" font-size="10">{xv:.4g}</text>')
    out.append(f'<text x="{(L + width - R) / 2}" y="{height - 3}" text-anchor="middle" font-size="10">optimizer step</text>')
    for k, (label, xs_, ys_, colour) in enumerate(series):
        p = [(sx(x), sy(y)) for x, y in zip(xs_, ys_) if y is not None and np.isfinite(y) and (not ylog or y > 0)]
        if not p:
            continue
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in p)}"/>')
        if len(p) < 40:
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.2" fill="{colour}"/>' for a, b in p)
        out.append(f'<text x="{width - R - 4}" y="{Tm + 14 + 13 * k}" text-anchor="end" font-size="11" fill="{colour}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def learning_curves_svg(metrics: list[dict]) -> str:
    steps = [m for m in metrics if m.get("type") == "step"]
    epochs = [m for m in metrics if m.get("type") == "epoch"]

    def col(rows, key):
        return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]

    charts = [
        _svg_chart([("train task loss", *col(steps, "task_loss"), "#1f77b4"), ("val loss", *col(epochs, "val_loss"), "#d62728")], "loss", ylog=True),
        _svg_chart([("train acc", *col(steps, "acc"), "#1f77b4"), ("val acc", *col(epochs, "val_acc"), "#d62728")], "accuracy"),
        _svg_chart([("wiring cost", *col(steps, "wiring_cost"), "#2ca02c"), ("attention entropy", *col(steps, "attn_entropy"), "#9467bd")], "attention"),
    ]
    return "<div>" + "".join(charts) + "</div>"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def numbers_table(analysis: dict) -> str:
    """Key numbers, trained vs init."""
    tr, it = analysis["trained"], analysis.get("init")

    def get(res, path):
        node = res
        for p in path:
            if node is None:
                return None
            node = node.get(p) if isinstance(node, dict) else None
        return node

    rows = [
        ("accuracy on the analysed split", ("data", "accuracy")),
        ("mean wiring length Σ A·d", ("connectivity", "wiring_length", "mean")),
        (f"locality (mass within r={tr['connectivity']['locality']['radius']:g})", ("connectivity", "locality", "mean")),
        ("feed-forward share", ("connectivity", "layer_flow", "mean", "feedforward")),
        ("lateral share", ("connectivity", "layer_flow", "mean", "lateral")),
        ("feedback share", ("connectivity", "layer_flow", "mean", "feedback")),
        ("strong graph: modularity (Louvain)", ("connectivity", "graph", "modularity")),
        ("strong graph: communities", ("connectivity", "graph", "num_communities")),
        ("strong graph: clustering", ("connectivity", "graph", "small_world", "clustering")),
        ("strong graph: path length", ("connectivity", "graph", "small_world", "path_length")),
        ("strong graph: small-world σ", ("connectivity", "graph", "small_world", "sigma")),
        ("mean |d′|", ("topography", "dprime", "mean_abs")),
        ("mean of max d′ per column", ("topography", "dprime", "max_per_column_mean")),
        ("tuning smoothness index", ("topography", "smoothness", "smoothness")),
        ("  shuffled-position control", ("topography", "smoothness", "shuffled_mean")),
        ("  z vs control", ("topography", "smoothness", "shuffled_z")),
        ("weight-similarity smoothness", ("topography", "weight_similarity", "smoothness")),
        ("  shuffled-position control", ("topography", "weight_similarity", "shuffled_mean")),
    ]
    head = "<tr><th>metric</th><th>trained</th>" + ("<th>init</th>" if it else "") + "</tr>"
    body = []
    for label, path in rows:
        a = get(tr, path)
        b = get(it, path) if it else None
        if a is None and b is None:
            continue
        body.append(f"<tr><td>{html.escape(label)}</td><td>{_fmt(a)}</td>" + (f"<td>{_fmt(b)}</td>" if it else "") + "</tr>")
    return f'<table class="num" id="numbers">{head}{"".join(body)}</table>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption class="muted">{html.escape(alt)}</figcaption></figure>'


def _markdown_html(text: str) -> str:
    """The tables and paragraphs of a generated markdown file (``brain.md``) as HTML: ``|`` rows become a table
    (the ``|---|`` line dropped), other non-empty lines paragraphs."""
    parts: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            parts.append(f'<table class="num"><tr>{head}</tr>{body}</table>')
            rows.clear()

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line:
            parts.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "".join(parts)


def brain_sections(run_dir: Path) -> str:
    """One section per model-brain comparison written by ``columnformer brain`` (RUN/brain/<name>/: brain.md and
    its figures); empty when there is none."""
    out = []
    for result in sorted((run_dir / "brain").glob("*/brain.md")):
        folder = result.parent
        figs = "".join(_img(p, f"{folder.name}: {p.stem.replace('_', ' ')}") for p in sorted((folder / "figures").glob("*.png")))
        out.append(f'<h3>{html.escape(folder.name)}</h3>{_markdown_html(result.read_text())}{figs}')
    if not out:
        return ""
    return '<h2 id="brain">Model–brain comparison</h2>' + "".join(out)


def _slim(analysis: dict) -> dict:
    """analysis.json without the bulky per-column arrays (for the page's JSON dump)."""
    drop = {"top_incoming", "per_class_per_column", "class_means", "config"}

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items() if k not in drop}
        return x

    return walk(analysis)


def build_report(run_dir: str | Path, out: str | Path | None = None, top_m: int | None = None, analyze_opts=None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``); runs ``analyze`` first when analysis.json is missing or stale
    (made from another checkpoint file, split or checkpoint choice than ``analyze_opts`` ask for)."""
    from ..run import MetricsLog, read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    from .analyze import current_analysis

    analysis = current_analysis(run_dir, analyze_opts, quiet=False)  # analysed again when missing or stale
    arrays = np.load(run_dir / "analysis_arrays.npz")
    geometry = cfg.model.geometry.build()
    layout = sheet_layout(geometry)
    payload = explorer_payload(
        layout, arrays["top_src"], arrays["top_weight"], arrays["dprime"], arrays["column_wiring_length"], m=top_m
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl").read()
    fig_dir = run_dir / "figures" / "analysis"
    figs = "".join(_img(fig_dir / name, name.removesuffix(".png").replace("_", " ")) for name in analysis.get("figures", [])
                   if (fig_dir / name).exists())
    summary = analysis.get("summary") or {}
    head_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in analysis["headline"].items())
    sum_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in summary.items() if not isinstance(v, dict))
    name = html.escape(cfg.name)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Columnformer report — {name}</title><style>{_CSS}</style></head>
<body data-ready="0"><main>
<h1>Columnformer report — {name}</h1>
<p class="muted">{html.escape(str(run_dir))} · {html.escape(analysis['model']['geometry']['name'])} · {analysis['model']['columns']:,} columns ·
{html.escape(analysis['model']['connectivity'])} connectivity · {analysis['model']['num_params']:,} parameters · analysed on the
{html.escape(analysis['split'])} split ({analysis['trained']['data']['samples']} samples, checkpoint {html.escape(analysis['checkpoint'])})</p>
<h2>Headline</h2><table class="num" id="headline"><tr><th>metric</th><th>value</th></tr>{head_rows}</table>
<h2>Sheet explorer</h2>{explorer_html(payload)}
<h2>Learning curves</h2>{learning_curves_svg(metrics)}
<h2>Analysis: connectivity and topography</h2>{numbers_table(analysis)}
{figs}
{brain_sections(run_dir)}
<h2>Summary</h2><table class="num" id="summary"><tr><th>key</th><th>value</th></tr>{sum_rows}</table>
<h2>Config</h2><pre id="config">{html.escape(yaml.safe_dump(analysis.get('config') or cfg.model_dump(mode='json'), sort_keys=False))}</pre>
<h2>All analysis numbers</h2><details><summary>analysis.json (per-column arrays omitted)</summary>
<pre id="analysis-json">{html.escape(json.dumps(_slim(analysis), indent=1))}</pre></details>
</main></body></html>
"""
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
