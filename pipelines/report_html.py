"""The report of pipelines.report as one self-contained HTML page (no external resource of any kind).

Captions, URLs, uids and details are untrusted: every one is HTML-escaped (text and attributes),
links are made only for http(s) URLs, and a Content-Security-Policy lets the page run only its own
inline script (by nonce) and show only data: images, so even a missed escape could not run a script.
"""
from __future__ import annotations

import html
import secrets
from urllib.parse import urlsplit

from pipelines.publish import STAGES

COLOURS = {"web": "#2b6cb0", "synthetic": "#d69e2e", "inherited_web": "#68a0d8", "inherited_synthetic": "#e8c170"}


def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _link(url) -> str:
    if url and urlsplit(str(url)).scheme in ("http", "https"):
        return f'<a href="{e(url)}" rel="noopener noreferrer nofollow" target="_blank">{e(url)}</a>'
    return f"<span>{e(url)}</span>"


def _funnel_svg(funnel: dict) -> str:
    after = funnel["after"]
    top = max(n for _, n in after) or 1
    bar_h, gap, label_w, width = 26, 8, 90, 520
    parts = []
    for i, (name, n) in enumerate(after):
        y = i * (bar_h + gap)
        w = max(1, round(width * n / top))
        dropped = sum(funnel["rejected"].get(name, {}).values())
        note = f" (-{dropped})" if dropped else ""
        parts.append(f'<text x="0" y="{y + 18}" class="lbl">{e(name)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="#4a7c59"/>'
                     f'<text x="{label_w + w + 6}" y="{y + 18}" class="lbl">{n}{e(note)}</text>')
    h = len(after) * (bar_h + gap)
    return f'<svg width="{label_w + width + 120}" height="{h}" role="img" aria-label="funnel">{"".join(parts)}</svg>'


def _histogram_svg(scores: dict) -> str:
    bins, sources = scores["bins"], scores["sources"]
    if not sources:
        return "<p>No scored captions.</p>"
    w, h, pad = 640, 180, 30
    n_bins = len(bins) - 1
    shares = {name: [c / (sum(s["histogram"]) or 1) for c in s["histogram"]] for name, s in sources.items()}
    top = max(max(v) for v in shares.values()) or 1
    parts = []
    for name, share in shares.items():
        points = " ".join(f"{pad + (i + 0.5) * (w - 2 * pad) / n_bins:.1f},{h - pad - (h - 2 * pad) * v / top:.1f}"
                          for i, v in enumerate(share))
        parts.append(f'<polyline fill="none" stroke="{COLOURS.get(name, "#777")}" stroke-width="2" points="{points}"/>')
    ticks = "".join(f'<text x="{pad + i * (w - 2 * pad) / 4:.0f}" y="{h - 8}" class="tick">'
                    f'{bins[0] + i * (bins[-1] - bins[0]) / 4:.3f}</text>' for i in range(5))
    legend = "".join(f'<span class="key" style="background:{COLOURS.get(n, "#777")}"></span>{e(n)} ' for n in sources)
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="score histograms">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>{"".join(parts)}{ticks}</svg>'
            f'<div class="legend">{legend}&nbsp;&nbsp;share of each source\'s captions per cosine bin</div>')


def _score(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _card(item: dict) -> str:
    thumb = (f'<img src="{e(item["thumbnail"])}" alt="">' if item["thumbnail"] and
             str(item["thumbnail"]).startswith("data:image/") else '<div class="noimg">no image</div>')
    status = "kept" if item["kept"] else f'{e(item["stage"])}: {e(item["reason"])}'
    rows = "".join(f'<li class="{"on" if c.get("kept") else "off"}"><b>{e(c.get("source"))}</b> '
                   f'{_score(c.get("score"))} {e(c.get("text"))}</li>' for c in item["candidates"])
    extra = "".join(f"<div><b>{label}</b> {e(value)}</div>" for label, value in
                    (("detail", item["detail"]), ("duplicate of", item["duplicate_of"]),
                     ("primary", item["primary"])) if value)
    return (f'<div class="card" data-reason="{e(item["reason"])}">{thumb}<div class="meta">'
            f'<div class="status {"ok" if item["kept"] else "no"}">{status}</div>'
            f'<div class="uid">{e(item["uid"])}</div><div><b>web</b> {e(item["caption"])}</div>{extra}'
            f'<div class="url">{_link(item["url"])}</div><ul>{rows}</ul></div></div>')


def render(report: dict) -> str:
    nonce = secrets.token_urlsafe(16)
    funnel, scores = report["funnel"], report["scores"]
    reasons = [(s, r, n) for s in STAGES for r, n in sorted(funnel["rejected"].get(s, {}).items(), key=lambda kv: -kv[1])]
    reason_rows = "".join(f"<tr><td>{e(s)}</td><td>{e(r)}</td><td class=n>{n}</td>"
                          f"<td>{e(report['reasons'].get(s, {}).get(r, ''))}</td></tr>" for s, r, n in reasons)
    q_rows = "".join(
        f"<tr><td>{e(name)}</td><td class=n>{s['n']}</td><td class=n>{s['kept_fraction']:.3f}</td>"
        + "".join(f"<td class=n>{v:.4f}</td>" for v in s["quantiles"].values()) + "</tr>"
        for name, s in scores["sources"].items())
    q_head = "".join(f"<th>p{round(q * 100)}</th>" for q in next(iter(scores["sources"].values()))["quantiles"]) \
        if scores["sources"] else ""
    shard_rows = "".join(f"<tr><td>{e(s['file'])}</td><td class=n>{s['rows']}</td><td class=n>{s['bytes']:,}</td></tr>"
                         for s in report["shards"])
    options = "".join(f'<option value="{e(r)}">{e(r)}</option>'
                      for r in ["kept", *dict.fromkeys(i["reason"] for i in report["gallery"] if not i["kept"])])
    cards = "".join(_card(item) for item in report["gallery"])
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<title>capfilt report: {e(report['root'])}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:28px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}} td.n{{text-align:right}}
.lbl{{font-size:13px}} .tick{{font-size:11px;fill:#555}} .legend{{font-size:12px}}
.key{{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}}
.card{{display:flex;gap:8px;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}}
.card img,.noimg{{width:96px;height:96px;flex:none;object-fit:contain;background:#f3f3f3}}
.noimg{{display:flex;align-items:center;justify-content:center;color:#888;font-size:12px}}
.meta{{min-width:0;font-size:12px;overflow-wrap:anywhere}} .meta ul{{margin:4px 0;padding-left:16px}}
.status.ok{{color:#276749;font-weight:600}} .status.no{{color:#9b2c2c;font-weight:600}}
.uid,.url{{color:#666}} li.off{{color:#999}} .hidden{{display:none}}
</style></head>
<body>
<h1>capfilt report</h1>
<p>{e(report['root'])}: finished {e(report['finished_at'])} in {e(report['seconds'])} s.
{funnel['after'][0][1]} rows in, <b>{funnel['curated']} curated</b> ({funnel['kept_fraction']:.1%}),
{sum(n for _, _, n in reasons)} rejected.</p>
<h2>Funnel</h2>{_funnel_svg(funnel)}
<table><tr><th>stage</th><th>reason</th><th>rows</th><th>meaning</th></tr>{reason_rows}</table>
<h2>Caption scores (curated rows)</h2>{_histogram_svg(scores)}
<table><tr><th>source</th><th>captions</th><th>kept</th>{q_head}</tr>{q_rows}</table>
<h2>Curated files</h2><table><tr><th>file</th><th>rows</th><th>bytes</th></tr>{shard_rows}</table>
<h2>Samples</h2>
<p><label>Show <select id="reason"><option value="">everything</option>{options}</select></label>
<span id="shown"></span></p>
<div class="grid" id="gallery">{cards}</div>
<script nonce="{nonce}">
(function () {{
  var select = document.getElementById('reason'), cards = document.querySelectorAll('.card');
  function apply() {{
    var want = select.value, shown = 0;
    cards.forEach(function (card) {{
      var on = !want || card.getAttribute('data-reason') === want;
      card.classList.toggle('hidden', !on);
      if (on) shown++;
    }});
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' samples';
  }}
  select.addEventListener('change', apply);
  apply();
  document.body.setAttribute('data-report-ready', '1');
}})();
</script>
</body></html>
"""
