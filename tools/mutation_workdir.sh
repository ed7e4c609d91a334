#!/bin/sh
# Usage: tools/mutation_workdir.sh DIR "tests/test_a.py tests/test_b.py"
# Copies the repository's tracked files (as they are in the working tree) to DIR and makes the given test files
# mutmut's whole test selection there, so that a module's mutants run against its own fast tests only.
# mutmut's results stay in DIR/mutants between runs; a different selection starts them afresh.
set -eu
dir=$1
tests=$2
for test in $tests; do
    if [ ! -f "$test" ]; then
        echo "error: MUTATION_TESTS names $test, which is not a file (give test files, e.g. tests/test_files.py)" >&2
        exit 2
    fi
done
mkdir -p "$dir"
# a fresh copy each run (a file deleted or renamed here must not linger there); only mutmut's results are kept
find "$dir" -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$dir"
python3 - "$dir/pyproject.toml" $tests <<'PY'
import re, sys
path, tests = sys.argv[1], sys.argv[2:]
text = open(path).read()
selection = "pytest_add_cli_args_test_selection = [" + ", ".join(f'"{t}"' for t in tests) + "]\n"
text, count = re.subn(r"^pytest_add_cli_args_test_selection = \[[^\]]*\]\n", selection, text, flags=re.M)
if count != 1:
    sys.exit(f"error: {path} has no pytest_add_cli_args_test_selection line under [tool.mutmut]")
open(path, "w").write(text)
PY
