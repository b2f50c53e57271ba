"""The report of capfilt.pipelines.report as one self-contained HTML page (no external resource of any kind).

Captions, URLs, uids and details are untrusted: every one is HTML-escaped (text and attributes),
links are made only for http(s) URLs, and a Content-Security-Policy lets the page run only its own
inline script (by nonce) and show only data: images, so even a missed escape could not run a script.
"""
from __future__ import annotations

import html
import json
import secrets
from urllib.parse import urlsplit

from capfilt.pipelines import registry
from capfilt.pipelines.report import STAGE_COLUMNS, stage_cells

COLOURS = {"web": "#2b6cb0", "synthetic": "#d69e2e", "inherited_web": "#68a0d8", "inherited_synthetic": "#e8c170"}


def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _scheme(url) -> str:
    try:
        return urlsplit(str(url)).scheme
    except ValueError:  # "Invalid IPv6 URL": a `[` without `]` in the host, say
        return ""


def _link(url) -> str:
    if url and _scheme(url) in ("http", "https"):
        return f'<a href="{e(url)}" rel="noopener noreferrer nofollow" target="_blank">{e(url)}</a>'
    return f"<span>{e(url)}</span>"


def _funnel_svg(funnel: dict) -> str:
    """Rows left after each stage (green) and the rows that stage dropped (red), to scale."""
    after = funnel["after"]
    top = max(n for _, n in after) or 1
    bar_h, gap, label_w, width = 24, 8, 80, 560
    parts = []
    for i, (name, n) in enumerate(after):
        y = i * (bar_h + gap)
        w = round(width * n / top)
        dropped = sum(funnel["rejected"].get(name, {}).values())
        d = round(width * dropped / top)
        note = f"{n:,}" + (f"  ({dropped:,} rejected here)" if dropped else "")
        parts.append(f'<text x="0" y="{y + 17}" class="lbl">{e(name)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{max(w, 1)}" height="{bar_h}" fill="#4a7c59"/>'
                     + (f'<rect x="{label_w + w}" y="{y}" width="{max(d, 1)}" height="{bar_h}" fill="#c05050"/>'
                        if dropped else "")
                     + f'<text x="{label_w + w + d + 6}" y="{y + 17}" class="lbl">{e(note)}</text>')
    h = len(after) * (bar_h + gap)
    return (f'<svg width="{label_w + width + 200}" height="{h}" role="img" aria-label="funnel">{"".join(parts)}</svg>')


def _histogram_svg(name: str, stats: dict, bins: list[float]) -> str:
    """One source's score histogram as bars over the shared bins, with its p5/p50/p95 marked."""
    w, h, left, bottom, top_pad = 420, 150, 44, 22, 18
    counts, n_bins = stats["histogram"], len(bins) - 1
    top = max(counts) or 1
    span = (bins[-1] - bins[0]) or 1.0
    bar_w = (w - left - 8) / n_bins
    colour = COLOURS.get(name, "#777")

    def x(score: float) -> float:
        return left + (score - bins[0]) / span * (w - left - 8)

    bars = "".join(f'<rect x="{left + i * bar_w:.1f}" y="{h - bottom - (h - bottom - top_pad) * c / top:.1f}" '
                   f'width="{max(bar_w - 1, 1):.1f}" height="{(h - bottom - top_pad) * c / top:.1f}" fill="{colour}">'
                   f'<title>{bins[i]:.3f} to {bins[i + 1]:.3f}: {c}</title></rect>' for i, c in enumerate(counts) if c)
    marked = [(q, v) for q, v in stats["quantiles"].items() if q in (0.05, 0.5, 0.95)]
    marks = "".join(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top_pad}" y2="{h - bottom}" class="q">'
                    f'<title>p{round(q * 100)} {v:.3f}</title></line>' for q, v in marked)
    ticks = "".join(f'<text x="{x(bins[0] + span * i / 4):.1f}" y="{h - 6}" class="tick" '
                    f'text-anchor="{("start", "middle", "middle", "middle", "end")[i]}">'
                    f'{bins[0] + span * i / 4:.2f}</text>' for i in range(5))
    quantiles = " &middot; ".join(f"p{round(q * 100)} {v:.3f}" for q, v in marked)
    return (f'<figure class="hist"><figcaption><span class="key" style="background:{colour}"></span>'
            f'<b>{e(name)}</b>: {stats["n"]:,} captions, {stats["kept_fraction"]:.1%} kept; {quantiles}</figcaption>'
            f'<svg width="{w}" height="{h}" role="img" aria-label="{e(name)} score histogram">'
            f'<text x="{left - 4}" y="{top_pad + 4}" class="tick" text-anchor="end">{top}</text>'
            f'<text x="{left - 4}" y="{h - bottom}" class="tick" text-anchor="end">0</text>'
            f'<line x1="{left}" y1="{h - bottom}" x2="{w - 8}" y2="{h - bottom}" stroke="#999"/>'
            f'{bars}{marks}{ticks}</svg></figure>')


def _histograms(scores: dict) -> str:
    if not scores["sources"]:
        return "<p>No scored captions.</p>"
    return ('<div class="hists">' + "".join(_histogram_svg(name, s, scores["bins"]) for name, s in scores["sources"].items())
            + '</div><p class="legend">captions per cosine-similarity bin (image vs caption), one panel per caption '
              'source, same x axis; dashed lines mark p5, p50 and p95</p>')


def script_json(value) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` (so no `</script>` or `<!--`), and no
    U+2028/2029, whatever the strings hold."""
    text = json.dumps(value, ensure_ascii=True, sort_keys=True, default=str)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _score(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _card(item: dict) -> str:
    thumb = (f'<img src="{e(item["thumbnail"])}" alt="">' if item["thumbnail"] and
             str(item["thumbnail"]).startswith("data:image/") else '<div class="noimg">no image</div>')
    status = "kept" if item["kept"] else f'dropped at {e(item["stage"])}: {e(item["reason"])}'
    rows = "".join(f'<li class="{"on" if c.get("kept") else "off"}" title="{"kept" if c.get("kept") else "not kept"}">'
                   f'{"&#10003; " if c.get("kept") else ""}<b>{e(c.get("source"))}</b> '
                   f'<span class="sc">{_score(c.get("score")) or "unscored"}</span> {e(c.get("text"))}</li>'
                   for c in item["candidates"])
    extra = "".join(f"<div><b>{label}</b> {e(value)}</div>" for label, value in
                    (("primary", item["primary"]), ("best score", _score(item.get("best_score"))),
                     ("detail", item["detail"]), ("duplicate of", item["duplicate_of"])) if value)
    return (f'<div class="card{"" if item["kept"] else " dropped"}" data-reason="{e(item["reason"])}">{thumb}'
            f'<div class="meta"><div class="status {"ok" if item["kept"] else "no"}">{status}</div>'
            f'<div class="uid">uid {e(item["uid"])}</div><div><b>web caption</b> {e(item["caption"])}</div>{extra}'
            f'<div class="url">{_link(item["url"])}</div><ul>{rows}</ul></div></div>')


def table(head: tuple, rows: list[tuple], numeric: set[int], cls: str = "") -> str:
    """A table of escaped cells; the columns in `numeric` right-aligned."""
    def cells(row, tag):
        return "".join(f"<{tag}{' class=n' if i in numeric and tag == 'td' else ''}>{e(c)}</{tag}>" for i, c in enumerate(row))
    return (f'<table{f" class={cls}" if cls else ""}><tr>{cells(head, "th")}</tr>'
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>")


def render(report: dict) -> str:
    nonce = secrets.token_urlsafe(16)
    funnel, scores = report["funnel"], report["scores"]
    steps = registry.funnel()
    stage_order = [*steps, *sorted(set(funnel["rejected"]) - set(steps))]
    reasons = [(s, r, n) for s in stage_order for r, n in sorted(funnel["rejected"].get(s, {}).items(), key=lambda kv: -kv[1])]
    reason_rows = "".join(f"<tr><td>{e(s)}</td><td>{e(r)}</td><td class=n>{n:,}</td>"
                          f"<td>{e(report['reasons'].get(s, {}).get(r, ''))}</td></tr>" for s, r, n in reasons)
    q_rows = "".join(
        f"<tr><td>{e(name)}</td><td class=n>{s['n']:,}</td><td class=n>{s['kept_fraction']:.3f}</td>"
        + "".join(f"<td class=n>{v:.4f}</td>" for v in s["quantiles"].values()) + "</tr>"
        for name, s in scores["sources"].items())
    q_head = "".join(f"<th>p{round(q * 100)}</th>" for q in next(iter(scores["sources"].values()))["quantiles"]) \
        if scores["sources"] else ""
    stage_rows = "".join("<tr><td>" + e(cells[0]) + "</td>" + "".join(f"<td class=n>{e(c)}</td>" for c in cells[1:-1])
                         + f"<td>{e(cells[-1])}</td></tr>" for cells in map(stage_cells, report.get("stages") or []))
    stage_head = "".join(f"<th>{e(c)}</th>" for c in STAGE_COLUMNS)
    shard_rows = "".join(f"<tr><td>{e(s['file'])}</td><td class=n>{s['rows']:,}</td><td class=n>{s['bytes']:,}</td></tr>"
                         for s in report["shards"])
    shown = {}
    for item in report["gallery"]:
        shown[item["reason"]] = shown.get(item["reason"], 0) + 1
    # The filter's labels come from this data island: the rows of each reason in OUT and in the sample.
    totals = {"kept": funnel["curated"], **{r: n for _, r, n in reasons}}
    labels = [{"reason": r, "sampled": n, "total": totals.get(r)} for r, n in shown.items()]
    cards = "".join(_card(item) for item in report["gallery"])
    found = report.get("sections") or {}
    sections = "".join(f"<h2>{e(section.title)}</h2>{section.html(found[section.key], report['root'])}"
                       for stage in registry.stages() for section in stage.inspect if section.key in found)
    finished = (f"finished {e(report['finished_at'])}" if report.get("finished_at") else "") + \
        (f" in {float(report['seconds']):.0f} s" if report.get("seconds") is not None else "")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
           f"base-uri 'none'; form-action 'none'")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<title>capfilt report: {e(report['root'])}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}}
h1{{font-size:20px;margin-bottom:4px}} h2{{font-size:16px;margin-top:28px}} .sub{{color:#555;margin-top:0}}
table{{border-collapse:collapse;margin-top:8px}} td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}} th{{background:#f6f6f6}} td.bad{{color:#9b2c2c;font-weight:600}}
.side{{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}}
.lbl{{font-size:13px}} .tick{{font-size:10px;fill:#555}} .legend{{font-size:12px;color:#555}} line.q{{stroke:#333;stroke-dasharray:3 2}}
.key{{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}}
.hists{{display:grid;grid-template-columns:repeat(auto-fill,440px);gap:12px 24px}} .hist{{margin:0}} .hist figcaption{{font-size:13px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}}
.card{{display:flex;gap:10px;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden;background:#fff}}
.card.dropped{{border-color:#e3b4b4;background:#fffafa}}
.card img,.noimg{{width:96px;height:96px;flex:none;object-fit:contain;background:#f3f3f3}}
.noimg{{display:flex;align-items:center;justify-content:center;color:#888;font-size:12px;text-align:center}}
.meta{{min-width:0;font-size:12px;overflow-wrap:anywhere}} .meta ul{{margin:4px 0;padding-left:16px}}
.status.ok{{color:#276749;font-weight:600}} .status.no{{color:#9b2c2c;font-weight:600}}
.uid,.url{{color:#666}} li.off{{color:#888}} li .sc{{font-variant-numeric:tabular-nums}} .hidden{{display:none}}
#filter{{position:sticky;top:0;background:#fff;padding:6px 0;z-index:1}}
</style></head>
<body>
<h1>capfilt report</h1>
<p class="sub">{e(report['root'])} {finished}</p>
<p>{funnel['after'][0][1]:,} rows in, <b>{funnel['curated']:,} curated</b> ({funnel['kept_fraction']:.1%} of images kept),
{sum(n for _, _, n in reasons):,} rejected.</p>
<h2>Funnel</h2>{_funnel_svg(funnel)}
<table><tr><th>stage</th><th>reason</th><th>rows</th><th>meaning</th></tr>{reason_rows}</table>
{sections}
<h2>Stages</h2><table><tr>{stage_head}</tr>{stage_rows}</table>
<p class="legend">rows/s: rows in per second; MB: 2<sup>20</sup> bytes of Parquet the stage wrote; model passes: rows
run through each model in this run (a reused stage, or one re-selecting from stored scores, runs none)</p>
<h2>Caption scores (candidates of the curated rows)</h2>{_histograms(scores)}
<table><tr><th>source</th><th>captions</th><th>kept</th>{q_head}</tr>{q_rows}</table>
<h2>Curated files</h2><table><tr><th>file</th><th>rows</th><th>bytes</th></tr>{shard_rows}</table>
<h2>Samples</h2>
<p id="filter"><label>Show <select id="reason"><option value="">everything</option></select></label>
<span id="shown"></span></p>
<div class="grid" id="gallery">{cards}</div>
<script type="application/json" id="reasons">{script_json(labels)}</script>
<script nonce="{nonce}">
(function () {{
  var select = document.getElementById('reason'), cards = document.querySelectorAll('.card');
  JSON.parse(document.getElementById('reasons').textContent).forEach(function (r) {{
    var option = document.createElement('option');
    option.value = r.reason;
    option.textContent = r.reason + ' (' + r.sampled + (r.total != null ? ' of ' + r.total : '') + ')';
    select.appendChild(option);
  }});
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
  document.body.setAttribute('data-report-ready', String(select.options.length - 1));
}})();
</script>
</body></html>
"""
