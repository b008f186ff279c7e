"""Run pagi_ref's command line under cProfile; dump the stats on SIGTERM.

    python bench/profile_server.py OUT.prof bench/apps.py:app --port P --no-access-log

`python -m cProfile pagi_ref.py` would run the file as __main__ under the
profiler's own module, so `import pagi_ref` in the application would not get
the server's module; this imports pagi_ref normally and profiles main().
bench/run.py --profile uses it for E1 and puts the top functions in the report.
"""
import cProfile
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pagi_ref  # noqa: E402


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()
    code = 1
    try:
        code = profiler.runcall(pagi_ref.main, argv)
    finally:
        profiler.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
