"""The run report: plots and tables of one distillation run, as report.html and report.md.

Reads only what a run wrote to disk (``alignkd distill`` and ``alignkd eval``):

    RUN_DIR/metrics.jsonl   training and eval records, one JSON object a line (required)
    RUN_DIR/config.yaml     the resolved config, shown verbatim
    RUN_DIR/summary.json    parameter counts, training time, eval before and after
    RUN_DIR/eval.json       ``alignkd eval`` output: metrics per model, retention

and, for each baseline run, that run's metrics.jsonl, whose CE loss and eval
perplexity are drawn over the distilled run's.

The report is built once as a list of blocks (:mod:`.document`: headings,
paragraphs, tables, plots, code) and rendered twice (:mod:`.render`), so the HTML
and the Markdown hold the same tables: report.html is self-contained (plots as
base64 PNG data URIs, inline CSS, nothing fetched), report.md links its plots
from ``report_files/``. :mod:`.runlog` reads the run, :mod:`.headline`,
:mod:`.evaluation` and :mod:`.plots` make the blocks, :mod:`.write` puts it together.
"""

from alignkd.errors import ReportError
from alignkd.report.runlog import RunLog, read_run
from alignkd.report.write import write_report

__all__ = ["ReportError", "RunLog", "read_run", "write_report"]
