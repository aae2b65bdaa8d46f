"""The self-contained HTML page of the run report and the leaderboard (Jinja2, autoescaped).

:func:`render` fills one template with tables (:func:`evaluation.reporting.render.table_view`
dicts, each optionally with its figures), figures embedded as base64 PNG, plain extra
tables, warnings and notes. The page has no script and no external resource, so it opens
anywhere, offline, as one file.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import jinja2
from markupsafe import Markup

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
td { white-space: nowrap; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.warning { color: #8a4b00; background: #fff4e0; padding: 0.3em 0.6em; margin: 0.2em 0;
           border-left: 4px solid #e69500; }
.note { color: #444; }
.legend { font-size: 0.85em; color: #555; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f5f5f5; padding: 0 0.2em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% for line in intro %}<p class="note">{{ line }}</p>
{% endfor %}
{% for w in warnings %}<p class="warning">⚠ {{ w }}</p>
{% endfor %}
{% for t in tables %}
<section class="board">
<h2>{{ t.heading }}</h2>
<p class="note">table <code>{{ t.table_id }}</code>{% if t.seed %}, seed {{ t.seed }}{% endif %}</p>
{% for w in t.warnings %}<p class="warning">⚠ {{ w }}</p>
{% endfor %}
<div class="scroll"><table class="results">
<thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell | cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table></div>
<p class="legend">{{ t.legend | md }}</p>
{% for line in t.oracle %}
<p class="{{ 'warning' if line.startswith('⚠') else 'note' }}">{{ line | md }}</p>
{% endfor %}
{% for n in t.notes %}<p class="note">note: {{ n | md }}</p>
{% endfor %}
{% for f in t.figures %}<figure><img src="data:image/png;base64,{{ f.data }}" alt="{{ f.alt }}">
<figcaption>{{ f.alt }}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}
{% for extra in extras %}
<section class="extra">
<h2>{{ extra.title }}</h2>
<table class="results">
<thead><tr>{% for h in extra.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in extra.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
</section>
{% endfor %}
{% for f in figures %}<figure><img src="data:image/png;base64,{{ f.data }}" alt="{{ f.alt }}">
<figcaption>{{ f.alt }}</figcaption></figure>
{% endfor %}
</body>
</html>
"""


def _markdown(text: Any) -> str:
    """```code``` in a line as HTML; the rest escaped (stars stay: they are p-value marks)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text))))


def _cell(text: Any) -> str:
    """A table cell: a leading ``**mean**`` (the best entry) in bold, the rest as text."""
    escaped = html.escape(str(text))
    return Markup(re.sub(r"^\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["md"] = _markdown
    env.filters["cell"] = _cell
    return env


def render(
    title: str,
    tables: Sequence[dict],
    figures: Sequence[dict] = (),
    warnings: Sequence[str] = (),
    extras: Sequence[dict] = (),
    intro: Sequence[str] = (),
) -> str:
    """The page: ``tables`` as :func:`evaluation.reporting.render.table_view` dicts (each may carry
    ``figures``), ``figures`` ``{"data": base64 PNG, "alt": caption}``, ``extras`` plain
    tables ``{"title", "header", "rows"}``."""
    tables = [{**t, "figures": t.get("figures", [])} for t in tables]
    return (
        _environment()
        .from_string(TEMPLATE)
        .render(
            title=title,
            tables=tables,
            figures=list(figures),
            warnings=list(warnings),
            extras=list(extras),
            intro=list(intro),
        )
    )
