#!/bin/sh
# Usage: sh .ci/find_python.sh 3.12 3.13
# Prints the first interpreter that runs and is one of the given versions (in that order): on PATH
# as pythonX.Y, then pyenv's installs (a pyenv shim for a version that is not selected fails, so
# every candidate is run), then /usr/local/bin and /usr/bin. Exits 1 when none works.
for v in "$@"; do
  for c in "$(command -v "python$v" 2>/dev/null)" "$HOME"/.pyenv/versions/"$v".*/bin/python"$v" \
    /usr/local/bin/python"$v" /usr/bin/python"$v"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$v')" 2>/dev/null; then
      echo "$c"
      exit 0
    fi
  done
done
exit 1
