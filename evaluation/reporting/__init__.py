"""Presentation of scored runs: the leaderboard, the HTML reports and the figures.

The metrics, their registry and the statistics stay in :mod:`evaluation`; this package
reads what runs wrote and shows it. It imports nothing from :mod:`experiments`.

- :mod:`~evaluation.reporting.loading`: find ``results.csv`` files and read them with
  what lies beside them (``run.json``, ``warnings.json``, ``sanity.csv``);
- :mod:`~evaluation.reporting.pooling`: which rows form a table (normalising older files,
  de-duplicating repeated samples), method entries, headings in words;
- :mod:`~evaluation.reporting.tables`: the leaderboard frame (intervals, paired tests,
  ranks, the ground-truth oracle, the sanity column);
- :mod:`~evaluation.reporting.render`: what a table shows, and the Markdown;
- :mod:`~evaluation.reporting.page`: the self-contained HTML page (Jinja2);
- :mod:`~evaluation.reporting.report`: the files: a run's ``report.html``
  (``python -m evaluation.reporting.report RUN_DIR``) and ``leaderboard.csv/.md/.html``;
- :mod:`~evaluation.reporting.figures` and :mod:`~evaluation.reporting.map_grid`: the
  run's PNG figures;
- :mod:`~evaluation.reporting.cli` (``python -m evaluation.reporting DIRS...``, the
  ``fam-bench-leaderboard`` command): the leaderboard command.
"""
