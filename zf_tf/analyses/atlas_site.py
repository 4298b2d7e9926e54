"""The atlas' static site: plain HTML, one CSS file and PNGs, no script, no network.

Layout under `WORKDIR/atlas/`:
  index.html                          model, data, layers, units by class, how it was made
  atlas.json                          what the site holds (units, sizes, timings)
  layers-<n>/style.css                (n counts the renders: one such folder at a time)
  layers-<n>/<layer>/index.html       every unit as a thumbnail of its strongest projection
  layers-<n>/<layer>/unit_<u>.html    the unit's k projections beside its k input patches,
                                      activations, image ids, classes; prev/next/up links
  layers-<n>/<layer>/img/<u>_p<r>.png projection of rank r (on the receptive-field canvas)
  layers-<n>/<layer>/img/<u>_x<r>.png the input patch under it
  layers-<n>/<layer>/img/<u>_t.jpg    the layer page's thumbnail (large canvases only)

A small canvas (at most EXACT px: shown enlarged, with visible pixels) is an exact PNG; a
larger one is JPEG (`jpeg_quality`), shrunk with an antialiasing filter where it exceeds
`pixel_density` times the size it is shown at (CELL on a unit page, THUMB on a layer page).
On the paper model at 224 px (receptive fields of 75-139 px from conv3 up) JPEG is 4-6x
smaller than PNG: the site is 0.12 GB instead of 0.34 GB.

Every link is relative and names a file (no directory index), so the site works from
`file://` as from `python -m http.server`. A render writes its pages into a folder of a new
name (`layers-<n+1>`) and then replaces `index.html`, which links to them, in one rename:
a kill at any moment leaves the old site or the new one whole (never an index pointing at
pages half replaced), and a failed render leaves the previous one as it was; the previous
pages go once the new index is in place.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import html
import json
import os
import re
import shutil

import numpy as np
import tqdm
from PIL import Image

from zf_tf.core import rules

PAGES = "layers"  # the page folders' name: layers-<n>
CELL = 96  # displayed side (CSS px) of a projection or patch on a unit page
THUMB = 64  # displayed side of a layer page's thumbnails
EXACT = CELL // 2  # canvases up to this side (shown enlarged >= 2x) are stored as exact PNGs
TOP_CLASS_UNITS = 8  # units listed per class on the index

STYLE = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
a { color: #0645ad; text-decoration: none; } a:hover { text-decoration: underline; }
nav { margin-bottom: 1em; } nav a { margin-right: 1.2em; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) td { background: #f0f0f0; } .num { text-align: right; }
img { background: #888; } img[src$=".png"] { image-rendering: pixelated; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; }
.unit { display: inline-block; width: %(thumb)dpx; font-size: 11px; text-align: center;
        color: #333; }
.unit img { width: %(thumb)dpx; height: %(thumb)dpx; display: block; }
.unit small { display: block; color: #777; white-space: nowrap; overflow: hidden;
              text-overflow: ellipsis; }
.pair { display: flex; gap: 24px; align-items: flex-start; }
.cells { display: grid; grid-template-columns: repeat(%(columns)s, %(cell)dpx); gap: 3px; }
.cells img { width: %(cell)dpx; height: %(cell)dpx; display: block; }
.bar { background: #4a7fb5; height: 12px; display: inline-block; vertical-align: middle; }
.meta td:first-child { color: #555; }
.unit img.f, #show-f:checked ~ .grid .unit img.p { display: none; }
#show-f:checked ~ .grid .unit img.f { display: block; }
.featvis img { width: %(cell)dpx; height: %(cell)dpx; display: block; }
.featvis { width: min-content; }
.featvis .set { display: flex; gap: 3px; }
.featvis small { display: block; color: #555; }
"""


def slug(name: str) -> str:
    """A layer name as a file name (nested models' names may hold '/')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _page(title: str, body: str, css: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="{css}">'
        f"</head><body>\n{body}\n</body></html>\n"
    )


def _ext(side: int) -> str:
    """The file type of a layer's images: exact PNG for small canvases, else JPEG."""
    return "png" if side <= EXACT else "jpg"


@dataclasses.dataclass(frozen=True)
class FeatvisKind:
    """A kind of feature visualization a unit page can show (`FEATVIS_KINDS`)."""

    name: str
    suffix: str  # its files: img/<u>_<suffix>.<ext>, a diverse set's image j <u>_<suffix><j>
    caption: str  # before the objective its images reached; {k}: images per unit
    negative: bool  # made with the objective minimized (--mode=featvis' negative)
    diverse: bool  # a diverse set (config.analysis.featvis.diversity images), else one


# In the order a unit page shows them; which of them an atlas makes: `atlas.featvis_kinds`.
FEATVIS_KINDS = (
    FeatvisKind("maximized", "f", "optimized image: the unit's map mean", False, False),
    FeatvisKind("negative", "fn", "the pattern that most inhibits it: map mean", True, False),
    FeatvisKind("diverse", "fd", "a diverse set of {k}: map means", False, True),
)
_FEATVIS = {kind.name: kind for kind in FEATVIS_KINDS}


def _featvis_files(u: int, info: dict, kind: str = "maximized") -> list[str]:
    """A unit's feature visualizations of one kind (`FEATVIS_KINDS`: one image, or a
    diverse set), at the model's input size: PNG if small, else JPEG."""
    fv = info["featvis"][kind]
    ext = _ext(fv["image"].shape[1])
    suffix = _FEATVIS[kind].suffix
    if fv["per_unit"] == 1:
        return [f"{u:04d}_{suffix}.{ext}"]
    return [f"{u:04d}_{suffix}{j}.{ext}" for j in range(fv["per_unit"])]


def _thumbnail(u: int, side: int, s) -> str:
    """A layer page's image of unit u: its strongest projection, or a smaller copy."""
    if side <= THUMB * s.pixel_density:
        return f"{u:04d}_p0.{_ext(side)}"
    return f"{u:04d}_t.jpg"


def _save(path: str, image: np.ndarray, shown: int, s):
    """`image` as an exact PNG (a canvas of at most EXACT px), or as JPEG, shrunk to at
    most `shown` x density px (the caller names the file by `_ext` / `_thumbnail`)."""
    side = image.shape[0]
    if side <= EXACT:
        Image.fromarray(image).save(path, format="PNG")
        return
    limit = min(side, shown * s.pixel_density)
    small = Image.fromarray(image)
    if limit < side:
        small = small.resize((limit, limit), Image.Resampling.LANCZOS)
    small.save(path, format="JPEG", quality=s.jpeg_quality)


def _class_counts(labels: np.ndarray) -> collections.Counter:
    return collections.Counter(int(v) for v in labels if v >= 0)


def _name(names: list, label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"class {label}"


def _dominant(labels: np.ndarray, names: list) -> tuple[str, int] | None:
    """(class name, count) of the commonest label among a unit's winners; None: no labels."""
    counts = _class_counts(labels)
    if not counts:
        return None
    label, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return _name(names, label), count


def _layer_page(layer: str, info: dict, s, names: list, prev_next) -> str:
    best, k = info["scan"], info["scan"].k
    num_units = best.activation.shape[1]
    prev_layer, next_layer = prev_next
    links = ['<a href="../../index.html">&uarr; atlas</a>']
    if prev_layer:
        links.append(
            f'<a href="../{slug(prev_layer)}/index.html">&larr; {html.escape(prev_layer)}</a>'
        )
    if next_layer:
        links.append(
            f'<a href="../{slug(next_layer)}/index.html">{html.escape(next_layer)} &rarr;</a>'
        )
    h, w, _ = info["map_shape"]
    cells = []
    for u in range(num_units):
        dominant = _dominant(info["label"][u], names)
        note = f"{html.escape(dominant[0])} {dominant[1]}/{k}" if dominant else ""
        top = best.activation[0, u]
        picture = ""
        if "featvis" in info:
            picture = (
                f'<img class="f" src="img/{_featvis_files(u, info)[0]}" alt="unit {u} optimized">'
            )
        cells.append(
            f'<a class="unit" href="unit_{u:04d}.html" title="unit {u}: strongest {top:.3g}'
            f'{"; " + note if note else ""}"><img class="p" '
            f'src="img/{_thumbnail(u, info["side"], s)}" alt="unit {u}">{picture}'
            f"{u}<small>{note or f'{top:.3g}'}</small></a>"
        )
    switch = ""
    if "featvis" in info:
        switch = (
            'Show: <input type="radio" name="show" id="show-p" checked>'
            '<label for="show-p">strongest projection</label> '
            '<input type="radio" name="show" id="show-f">'
            '<label for="show-f">feature visualization</label>\n'
        )
    body = (
        f"<nav>{' '.join(links)}</nav>\n<h1>{html.escape(layer)}: {num_units} units</h1>\n"
        f"<p>Each unit's strongest activation over the {s.num_images} images of split "
        f"<b>{html.escape(s.split)}</b>, projected to pixel space by the deconvnet and cropped "
        f"to its {info['receptive_field']} px receptive field (maps {h}&times;{w}). Under each: "
        f"the commonest class of its top {k} images. Click a unit for its top {k}.</p>\n"
        + switch
        + '<div class="grid">\n'
        + "\n".join(cells)
        + "\n</div>"
    )
    return _page(f"{layer} · atlas", body, "../style.css")


def _unit_page(layer: str, u: int, info: dict, s, names: list) -> str:
    best, k = info["scan"], info["scan"].k
    num_units = best.activation.shape[1]
    links = [f'<a href="index.html">&uarr; {html.escape(layer)}</a>']
    if u > 0:
        links.append(f'<a href="unit_{u - 1:04d}.html" rel="prev">&larr; unit {u - 1}</a>')
    if u + 1 < num_units:
        links.append(f'<a href="unit_{u + 1:04d}.html" rel="next">unit {u + 1} &rarr;</a>')
    ranks = [r for r in range(k) if best.image[r, u] >= 0]
    what, ext = {"p": "projection", "x": "patch"}, _ext(info["side"])
    grid = lambda kind: "".join(
        f'<img src="img/{u:04d}_{kind}{r}.{ext}" alt="rank {r} {what[kind]}"'
        f' title="rank {r}: {best.activation[r, u]:.4g}">'
        for r in ranks
    )
    rows = []
    for r in ranks:
        label = int(info["label"][u, r])
        y0, x0, y1, x1 = (int(v) for v in info["box"][u, r])
        rows.append(
            f'<tr><td class="num">{r}</td><td class="num">{best.activation[r, u]:.4g}</td>'
            f'<td class="num">{int(best.image[r, u])}</td>'
            f"<td>{html.escape(_name(names, label)) if label >= 0 else '&ndash;'}</td>"
            f"<td>({int(best.y[r, u])}, {int(best.x[r, u])})</td>"
            f"<td>[{y0}:{y1}, {x0}:{x1}]</td></tr>"
        )
    counts = _class_counts(info["label"][u])
    histogram = ""
    if counts:
        bars = "".join(
            f'<tr><td>{html.escape(_name(names, label))}</td><td class="num">{n}</td>'
            f'<td><span class="bar" style="width:{int(160 * n / len(ranks))}px"></span></td></tr>'
            for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        histogram = f"<h2>Classes of its top {len(ranks)} images</h2>\n<table>{bars}</table>"
    body = (
        f"<nav>{' '.join(links)}</nav>\n<h1>{html.escape(layer)} &middot; unit {u}</h1>\n"
        f"<p>Its top {len(ranks)} activations over the {s.num_images} images of split "
        f"<b>{html.escape(s.split)}</b>: deconvnet projections (left) beside the input patches "
        f"under their {info['receptive_field']} px receptive fields (right), strongest first.</p>\n"
        f'<div class="pair"><div class="cells projections">{grid("p")}</div>'
        f'<div class="cells patches">{grid("x")}</div>{_featvis_cell(u, info)}</div>\n'
        "<h2>Activations</h2>\n<table><tr><th>rank</th><th>activation</th><th>image</th>"
        "<th>class</th><th>map (y, x)</th><th>input box [y, x]</th></tr>\n"
        + "\n".join(rows)
        + f"</table>\n<p>image: the position in split {html.escape(s.split)} "
        "(center crops, in dataset order).</p>\n" + histogram
    )
    return _page(f"{layer} unit {u} · atlas", body, "../style.css")


def _featvis_cell(u: int, info: dict) -> str:
    """A unit page's feature visualizations, each kind captioned with the objective its
    images reached ('' without)."""
    if "featvis" not in info:
        return ""
    parts = []
    for kind, fv in info["featvis"].items():  # of every unit, in order (atlas.compute)
        k = fv["per_unit"]
        mine = slice(u * k, (u + 1) * k)
        reached = ", ".join(f"{v:.4g}" for v in fv["value"][mine])
        start = max(fv["start"][mine])
        # only a negative image of a rectified layer is measured before the rectifier
        what = _FEATVIS[kind].caption.format(k=k) + (
            " before the rectifier" if fv["before_rectifier"] else ""
        )
        images = "".join(
            f'<img src="img/{name}" alt="unit {u} feature visualization ({kind})">'
            for name in _featvis_files(u, info, kind)
        )
        parts.append(
            f'<div class="featvis {kind}"><div class="set">{images}</div><small>{what} '
            f"{reached} (random start {start:.3g})</small></div>"
        )
    return "".join(parts)


def _index_page(result: dict, s, names: list, pages: str) -> str:
    layers = result["layers"]
    rows = []
    for layer, info in layers.items():
        h, w, f = info["map_shape"]
        rows.append(
            f'<tr><td><a href="{pages}/{slug(layer)}/index.html">{html.escape(layer)}</a></td>'
            f'<td class="num">{f}</td><td class="num">{h}&times;{w}</td>'
            f'<td class="num">{info["receptive_field"]}</td><td>{info["form"]}</td>'
            f"<td>{html.escape(_way_down(info['way_down']))}</td></tr>"
        )
    total = sum(info["map_shape"][2] for info in layers.values())
    k = next(iter(layers.values()))["scan"].k
    # Units by class: for each class, the units whose top-k it fills most.
    by_class = collections.defaultdict(list)
    for layer, info in layers.items():
        for u in range(info["map_shape"][2]):
            for label, n in _class_counts(info["label"][u]).items():
                by_class[label].append((-n, layer, u))
    class_rows = []
    for label in sorted(by_class):
        picks = sorted(by_class[label], key=lambda t: (t[0], list(layers).index(t[1]), t[2]))
        links = " ".join(
            f'<a href="{pages}/{slug(layer)}/unit_{u:04d}.html" title="{-n}/{k} of its top {k}">'
            f"{html.escape(layer)}/{u}&nbsp;({-n})</a>"
            for n, layer, u in picks[:TOP_CLASS_UNITS]
        )
        class_rows.append(f"<tr><td>{html.escape(_name(names, label))}</td><td>{links}</td></tr>")
    data = s.data
    source = data.get("source", "")
    dataset = data.get("folder") if source == "folder" else data.get("name", "")
    timings = result.get("timings", {})
    made = [
        ("model", html.escape(s.description)),
        (
            "data",
            f"{html.escape(str(source))} {html.escape(str(dataset))}, split "
            f"<b>{html.escape(s.split)}</b>: {s.num_images} images "
            f"({s.crop_size} px center crops of {s.resize_size} px)",
        ),
        ("units", f"{total} in {len(layers)} layers, top {k} each"),
        (
            "how",
            "one streaming pass over the split keeps each unit's top activations (each "
            "image once per unit, ties to the earlier image); every winner is projected "
            "to pixel space by the deconvnet (Zeiler &amp; Fergus 2014, Fig. 2)",
        ),
        (
            "images",
            f"receptive fields up to {EXACT} px as exact PNGs, larger ones as JPEG (quality "
            f"{s.jpeg_quality}), shrunk to at most {s.pixel_density}&times; their shown size "
            "(<code>config.analysis.atlas</code>)",
        ),
        ("command", f"<code>{html.escape(s.command)}</code>" if s.command else "&ndash;"),
        (
            "made",
            datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
            + "".join(f"; {name} {seconds:.1f} s" for name, seconds in timings.items()),
        ),
    ]
    meta = "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in made)
    body = (
        f'<h1>Atlas</h1>\n<table class="meta">{meta}</table>\n'
        "<h2>Layers</h2>\n<table><tr><th>layer</th><th>units</th><th>maps</th>"
        "<th>receptive field (px)</th><th>projection</th><th>way down (deconvnet rule at "
        "each activation below)</th></tr>\n"
        + "\n".join(rows)
        + "</table>\n"
        + (
            f"<h2>Units by class</h2>\n<p>For each class, the units whose top {k} images it "
            "fills most (count in brackets).</p>\n<table>" + "\n".join(class_rows) + "</table>"
            if class_rows
            else ""
        )
    )
    return _page("Atlas", body, f"{pages}/style.css")


def _way_down(records: list[dict]) -> str:
    """'relu x 5: ReLU of the signal (...)': each activation below a layer, how many times,
    what the rule does there."""
    counts = rules.way_down_counts(records)
    return "; ".join(f"{a} \u00d7 {n}: {what}" for a, n, what in counts) or "none"


def _page_weight(page: str) -> int:
    """A page's bytes with the images it shows."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    folder = os.path.dirname(page)
    images = set(re.findall(r'src="([^"]+)"', text))
    return os.path.getsize(page) + sum(os.path.getsize(os.path.join(folder, i)) for i in images)


def write(atlas_dir: str, result: dict, s) -> dict:
    """Writes the site under `atlas_dir` (see the module docstring); returns what atlas.json
    holds: units, files, bytes, the largest page and its bytes with its images, timings."""
    names = list(result.get("class_names") or [])
    layers = result["layers"]
    tmp = os.path.join(atlas_dir, ".site-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed render's leftovers
    old_pages = pages_folders(atlas_dir)
    folder_name = f"{PAGES}-{1 + max(map(_number, old_pages), default=0)}"
    try:
        os.makedirs(os.path.join(tmp, folder_name))
        k = next(iter(layers.values()))["scan"].k
        css = STYLE % {"thumb": THUMB, "cell": CELL, "columns": int(np.ceil(np.sqrt(k)))}
        with open(os.path.join(tmp, folder_name, "style.css"), "w", encoding="utf-8") as f:
            f.write(css)
        order = list(layers)
        total = sum(info["map_shape"][2] for info in layers.values())
        with tqdm.tqdm(total=total, desc="render atlas", unit="unit") as bar:
            for i, (layer, info) in enumerate(layers.items()):
                folder = os.path.join(tmp, folder_name, slug(layer))
                os.makedirs(os.path.join(folder, "img"))
                neighbours = (
                    order[i - 1] if i else None,
                    order[i + 1] if i + 1 < len(order) else None,
                )
                with open(os.path.join(folder, "index.html"), "w", encoding="utf-8") as f:
                    f.write(_layer_page(layer, info, s, names, neighbours))
                best, side, ext = info["scan"], info["side"], _ext(info["side"])
                img = os.path.join(folder, "img")
                for units, read in info["chunks"]:  # one chunk of images in memory at a time
                    cells = read()
                    for i, u in enumerate(units):
                        for r in range(best.k):
                            if best.image[r, u] < 0:
                                continue
                            for kind, key in (("p", "projection"), ("x", "patch")):
                                path = os.path.join(img, f"{u:04d}_{kind}{r}.{ext}")
                                _save(path, cells[key][i, r], CELL, s)
                        if side > THUMB * s.pixel_density:
                            path = os.path.join(img, _thumbnail(u, side, s))
                            _save(path, cells["projection"][i, 0], THUMB, s)
                        for kind, fv in info.get("featvis", {}).items():  # every unit, in order
                            k = fv["per_unit"]
                            for j, name in enumerate(_featvis_files(u, info, kind)):
                                _save(os.path.join(img, name), fv["image"][u * k + j], CELL, s)
                        with open(
                            os.path.join(folder, f"unit_{u:04d}.html"), "w", encoding="utf-8"
                        ) as f:
                            f.write(_unit_page(layer, u, info, s, names))
                        bar.update(1)
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(_index_page(result, s, names, folder_name))
        files, size, pages = 0, 0, []
        for root, _, found in os.walk(tmp):
            for name in found:
                files += 1
                size += os.path.getsize(os.path.join(root, name))
                if name.endswith(".html"):
                    pages.append(os.path.join(root, name))
        weights = {p: _page_weight(p) for p in pages}
        largest = max(weights, key=weights.get)
        summary = {
            "units": total,
            "layers": {layer: info["map_shape"][2] for layer, info in layers.items()},
            "way_down": {layer: info["way_down"] for layer, info in layers.items()},
            "k": k,
            "split": s.split,
            "num_images": s.num_images,
            "files": files + 1,  # and atlas.json
            "bytes": size,
            "largest_page": os.path.relpath(largest, tmp),
            "largest_page_bytes": weights[largest],
            "timings": {name: round(t, 2) for name, t in result.get("timings", {}).items()},
        }
        with open(os.path.join(tmp, "atlas.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        # Into place: the new pages beside the old, then the index that links to them in
        # one rename (the switch), then the old pages out.
        os.replace(os.path.join(tmp, folder_name), os.path.join(atlas_dir, folder_name))
        for name in ("index.html", "atlas.json"):
            os.replace(os.path.join(tmp, name), os.path.join(atlas_dir, name))
        for name in old_pages:
            shutil.rmtree(os.path.join(atlas_dir, name), ignore_errors=True)
        legacy_style = os.path.join(atlas_dir, "style.css")  # an older site's, beside its index
        if os.path.exists(legacy_style):
            os.remove(legacy_style)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def pages_folders(atlas_dir: str) -> list[str]:
    """The page folders under `atlas_dir` (`layers-<n>`, and an older site's `layers`)."""
    if not os.path.isdir(atlas_dir):
        return []
    return sorted(n for n in os.listdir(atlas_dir) if re.fullmatch(rf"{PAGES}(-\d+)?", n))


def _number(folder: str) -> int:
    """n of `layers-<n>`; 0 for an older site's `layers`."""
    return int(folder.partition("-")[2] or 0)


def pages_folder(atlas_dir: str) -> str:
    """The page folder the site's index.html links to (the newest `layers-<n>`)."""
    found = [n for n in pages_folders(atlas_dir) if _number(n)]
    if not found:
        raise FileNotFoundError(f"no atlas pages under {atlas_dir}")
    return os.path.join(atlas_dir, max(found, key=_number))
