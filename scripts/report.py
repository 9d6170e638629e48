"""Fill the README's generated regions and write the pages under results/ from the result files.

    python scripts/report.py            # results/ -> README.md regions, results/*.md
    python scripts/report.py --check    # exit 1, naming them, if any region or page is stale
"""

from fastcore.script import call_parse, CliError

from normnets_data import REPO_DIR
from normnets_files import FolderError, check_out
from normnets_cli import cli_errors, path_option
import normnets_report as report


@call_parse
def main(
    results:str=None,   # results folder (default: results/)
    readme:str=None,    # README to fill (default: README.md)
    check:bool=False,   # only check: fail if the files and the README or pages disagree
):
    "Write (or check) the README's generated regions and the pages under results/."
    with cli_errors():   # a missing folder or README, result files that contradict each other
        results = path_option('results', results, REPO_DIR / 'results')
        readme = path_option('readme', readme, REPO_DIR / 'README.md')
        if not results.is_dir(): raise FolderError(f"--results {results}: no such folder")
        if not readme.is_file(): raise FolderError(f"--readme {readme}: no such file")
        if check:   # reads only: a read-only checkout can be checked
            found = report.problems(results, readme)
            if found: raise CliError(f"out of date: {report.said(found)}")
            print("README and results pages are current")
        else:
            check_out(results, create=False)
            for path in report.write_report(results, readme): print(f"wrote {path}")
