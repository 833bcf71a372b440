"""The end-to-end benchmark: the harness (harness.py), its numbers and Markdown (report.py) and plots
(plots.py). `kangaroo bench` is its command line (cli.py)."""
from .harness import (DEFAULT_METHODS, METHODS, make_runner, new_results, parse_methods, resumed,  # noqa: F401
                      run_benchmark, write_outputs)
from .report import latest_summary, markdown_report, summarize  # noqa: F401
