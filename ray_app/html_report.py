"""Small HTML pages for the tables the pipeline logs to MLflow, so they open as readable pages in MLflow's artifact
view: UTF-8 declared (without it browsers guess Latin-1 and show "â€“" for "–"), a title, and a line on what the
table is and how to read it."""

from __future__ import annotations

import html

import pandas as pd

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}h1{font-size:1.3rem}h2{font-size:1.05rem}"
    "p{max-width:60rem;line-height:1.4}table{border-collapse:collapse;font-size:.9rem;margin-bottom:1.2rem}"
    "th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f3f3f3}"
)


def page(title: str, intro: str, sections: dict[str, pd.DataFrame | str]) -> str:
    """A whole document: heading, intro, then each section's heading and table (or paragraph)."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for heading, content in sections.items():
        if heading:
            body.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, pd.DataFrame):
            body.append(content.to_html(index=False, border=0, na_rep=""))
        else:
            body.append(f"<p>{html.escape(content)}</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
