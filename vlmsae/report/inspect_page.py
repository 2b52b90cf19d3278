"""The page of ``python -m vlmsae.inspect``: one section per image, one card per top latent, from disk.

:func:`draw_images` writes the pictures next to the page (``img/``: a square thumbnail of each inspected image and
of each latent's top images from the MS run, cropped as the model saw them; ``heat/``: each hit's patch heatmap
drawn over its image with the browser's colour ramp, one scale per latent so the same colour means the same
activation on every image) and records their relative paths in the :class:`~vlmsae.formats.InspectResult`.
:func:`write_page` renders ``inspect.html`` in the browser's style (``templates/browser.css``); everything it shows
comes from that result, escaped, and the page loads nothing but those PNG/JPEG files. :func:`wandb_rows` gives the
rows of the job logger's table (heatmaps as image cells). The feature browser links its cards to this page
(:func:`vlmsae.report.browser.inspect_links`).
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Any

from vlmsae.formats import InspectResult
from vlmsae.report.browser import INSPECT_PAGE, TEMPLATE_DPATH, card_overlay_image, quantize_grid, write_thumbnail
from vlmsae.utils.io import atomic_write, atomic_write_text, write_csv_rows

PAGE = INSPECT_PAGE
TABLE_CSV = "inspect_latents.csv"


def _hits(result: InspectResult) -> list[tuple[int, dict[str, Any]]]:
    """Every latent hit the page draws, with its image's index: each image's top lists and the query's hits."""
    out = [(i, h) for i, im in enumerate(result.images) for h in (*im["top_pooled"], *im["top_peak"])]
    for q in (result.query or {}).get("hits", []):
        out += [(i, h) for i, h in enumerate(q["per_image"]) if h is not None]
    return out


def draw_images(result: InspectResult, out_dpath: str | Path, thumb_px: int = 160) -> InspectResult:
    """Write the thumbnails and heatmap overlays under ``out_dpath`` and set ``thumb`` / ``heat_png`` / the
    latents' ``top`` in ``result`` (relative paths; None where an image could not be read)."""
    out_dpath = Path(out_dpath)
    (out_dpath / "img").mkdir(parents=True, exist_ok=True)
    (out_dpath / "heat").mkdir(exist_ok=True)
    for i, im in enumerate(result.images):
        rel = f"img/image_{i:04d}.jpg"
        im["thumb"] = rel if im.get("path") and write_thumbnail(im["path"], out_dpath / rel, thumb_px) else None
    hits = _hits(result)
    scale: dict[int, float] = {}
    for _, h in hits:
        scale[h["latent"]] = max(scale.get(h["latent"], 0.0), max(h["heat"], default=0.0))
    for i, h in hits:
        thumb = result.images[i].get("thumb")
        h["heat_png"] = None
        if not thumb or not h["heat"]:
            continue
        rel = f"heat/image_{i:04d}_latent_{h['latent']}.png"
        if not (out_dpath / rel).is_file():
            grid = quantize_grid(h["heat"], scale[h["latent"]])
            overlay = card_overlay_image(out_dpath / thumb, grid)
            atomic_write(out_dpath / rel, lambda tmp, img=overlay: img.save(tmp, format="PNG"))
        h["heat_png"] = rel
    for info in result.latents.values():
        top = []
        for path in info.pop("top_paths", []):
            rel = f"img/top_{hashlib.sha1(str(path).encode()).hexdigest()[:16]}.jpg"
            if (out_dpath / rel).is_file() or write_thumbnail(path, out_dpath / rel, 64):
                top.append(rel)
        info["top"] = top
    return result


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{float(x):.{digits}f}"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(src: str | None, alt: str, cls: str = "") -> str:
    if not src:
        return f'<div class="noimg">{_e(alt)}</div>'
    return f'<img src="{_e(src)}" alt="{_e(alt)}" title="{_e(alt)}"{f" class={cls!r}" if cls else ""}>'


def _latent_card(hit: dict[str, Any], info: dict[str, Any], extra: str, seen: set[int]) -> str:
    """One latent's card; the first card of a latent on the page (not in ``seen``) carries the anchor
    ``#latent-<id>``."""
    latent = hit["latent"]
    anchor = "" if latent in seen else f' id="latent-{latent}"'
    seen.add(latent)
    group = info.get("group")
    strip = "".join(f"<figure>{_img(src, 'top image')}</figure>" for src in info.get("top", []))
    fires = hit["peak"] is not None and hit["peak"] > 0
    meta = [
        f"pooled {_fmt(hit['pooled'])}" if fires else "does not fire here",
        f"peak {_fmt(hit['peak'])}" + (f" at patch {hit['peak_patch']}" if hit["peak_patch"] >= 0 else ""),
        f"MS {_fmt(info.get('ms'))}",
        f"freq {_fmt(info.get('freq'), 4)}",
        "no group" if group is None else f"group {group}",
    ]
    also = ", ".join(info.get("names", [])[1:])
    return (
        f'<article class="card"{anchor}><div class="card-head"><span class="lid">#{latent}</span>'
        f'<span class="ms">{_e(extra)}</span></div>'
        f'<div class="name">{_e(info.get("name", ""))}</div>'
        f'<div class="meta">{_e(" · ".join(meta))}</div>'
        + (f'<div class="meta">also: {_e(also)}</div>' if also else "")
        + f'<div class="inspect-heat">{_img(hit.get("heat_png"), f"latent {latent} on this image")}</div>'
        + (f'<div class="meta">top images of the MS run</div><div class="thumbs">{strip}</div>' if strip else "")
        + "</article>"
    )


def _section(i: int, im: dict[str, Any], latents: dict[str, Any], seen: set[int]) -> str:
    head = (
        f'<section class="panel inspect-image" id="image-{i}"><h2>{_e(im["key"])}</h2>'
        f'<div class="inspect-row">{_img(im.get("thumb"), im["key"], "inspect-thumb")}<div class="meta">'
        f"reconstruction of its {im['n_rows']} token row(s): FVE {_fmt(im['fve'])}, normalised MSE "
        f"{_fmt(im['nmse'])}" + (f"; {im['grid']}x{im['grid']} patches" if im.get("grid") else "") + "</div></div>"
    )
    parts = [head]
    for title, key in (("top latents by pooled activation", "top_pooled"), ("by peak patch activation", "top_peak")):
        cards = "".join(_latent_card(h, latents.get(str(h["latent"]), {}), "", seen) for h in im[key])
        parts.append(f'<h3>{_e(title)}</h3><div class="inspect-cards">{cards or "<p class=muted>none</p>"}</div>')
    return "".join(parts) + "</section>"


def _query_section(result: InspectResult, seen: set[int]) -> str:
    """The query's latents, best match first: one card per (latent, image), the cosine and the image on top."""
    q = result.query
    if not q:
        return ""
    cards = []
    for hit in q["hits"]:
        info = result.latents.get(str(hit["latent"]), {})
        for i, h in enumerate(hit["per_image"]):
            label = f"cos {_fmt(hit['score'])} · {result.images[i]['key']}"
            cards.append(_latent_card(h, info, label, seen))
    head = f"query: {q['text']} (latents whose concept is closest to the text, best first)"
    return f'<section class="panel"><h2>{_e(head)}</h2><div class="inspect-cards">{"".join(cards)}</div></section>'


def _compare_section(result: InspectResult) -> str:
    c = result.compare
    if not c:
        return ""
    out = [f'<section class="panel"><h2>compare {_e(c["a"])} vs {_e(c["b"])}</h2>']
    for title, key in ((f"stronger on {c['a']}", "a_over_b"), (f"stronger on {c['b']}", "b_over_a")):
        body = "".join(
            f"<tr><td>#{r['latent']} {_e(result.latents.get(str(r['latent']), {}).get('name', ''))}</td>"
            f"<td>{_fmt(r['a'])}</td><td>{_fmt(r['b'])}</td><td>{_fmt(r['diff'])}</td></tr>"
            for r in c[key]
        )
        head = "<tr><th>latent</th><th>a</th><th>b</th><th>a - b</th></tr>"
        out.append(f"<h3>{_e(title)}</h3><table>{head}{body}</table>")
    return "".join(out) + "</section>"


_CSS = """
.inspect-row { display: flex; gap: 14px; align-items: flex-start; }
.inspect-thumb { width: 160px; border-radius: 4px; }
.inspect-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; }
.inspect-heat img { width: 160px; border-radius: 4px; display: block; margin: 6px 0; }
.panel { margin-bottom: 14px; }
h3 { font-size: 13px; margin: 10px 0 6px; }
"""


def write_page(result: InspectResult, out_dpath: str | Path, title: str = "vlmsae inspect") -> Path:
    """``out_dpath/inspect.html`` from ``result`` (after :func:`draw_images`); opens from disk."""
    s = result.settings
    line = " · ".join(
        str(p) for p in (s.get("model"), f"layer {s.get('layer')}", f"pool {s.get('pool')}", f"SAE {s.get('sae_path')}")
    )
    seen: set[int] = set()
    body = [
        f'<header class="top"><div class="title-row"><h1>{_e(title)}</h1><span class="muted">{_e(line)}</span>'
        "</div></header><main>",
        _query_section(result, seen),
        _compare_section(result),
        *(_section(i, im, result.latents, seen) for i, im in enumerate(result.images)),
        "</main>",
    ]
    css = (TEMPLATE_DPATH / "browser.css").read_text(encoding="utf-8") + _CSS
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data: file:; "
        f"style-src 'unsafe-inline'\"><title>{_e(title)}</title><style>{css}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
    return atomic_write_text(Path(out_dpath) / PAGE, page)


def write_table(result: InspectResult, out_dpath: str | Path) -> Path:
    """``out_dpath/inspect_latents.csv``: one row per (image, top latent by pooled activation): the numbers, the
    name, and ``heatmap`` = the overlay's path (the job logger logs it, heatmaps as images)."""
    out_dpath = Path(out_dpath)
    rows = []
    for im in result.images:
        for rank, h in enumerate(im["top_pooled"]):
            info = result.latents.get(str(h["latent"]), {})
            rows.append(
                {
                    "image": im["key"],
                    "rank": rank,
                    "latent": h["latent"],
                    "name": info.get("name", ""),
                    "pooled": h["pooled"],
                    "peak": h["peak"],
                    "ms": info.get("ms"),
                    "freq": info.get("freq"),
                    "group": info.get("group"),
                    "fve": im["fve"],
                    "heatmap": str(out_dpath / h["heat_png"]) if h.get("heat_png") else None,
                }
            )
    return write_csv_rows(out_dpath / TABLE_CSV, rows, None if rows else ["image", "latent"])
