"""Small HTML reports a person can open: image galleries and tables, self-contained (base64
images)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; } img { max-width: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .8rem; }
figure { margin: 0; } figure img { width: 100%; image-rendering: pixelated; border-radius: 4px; }
figcaption { font-size: .8rem; line-height: 1.2; } figcaption span { display: block; color: #666; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
"""


def data_uri(image_bytes: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode()}"


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def grid(items: Iterable[tuple[bytes, Sequence[str]]]) -> str:
    """Figures of (jpeg bytes, caption lines); the first line is the main caption."""
    figures = []
    for image, lines in items:
        head, *rest = [html.escape(str(line)) for line in lines] or [""]
        extra = "".join(f"<span>{line}</span>" for line in rest)
        figures.append(
            f"<figure><img src='{data_uri(image)}'><figcaption>{head}{extra}</figcaption></figure>"
        )
    return f"<div class='grid'>{''.join(figures)}</div>"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def image_grid_html(title: str, items: Iterable[tuple[bytes, Sequence[str]]]) -> str:
    return page(title, grid(items))


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on workers or CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """Lay out, render and close a matplotlib figure -> PNG bytes."""
    import io

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()
