#!/usr/bin/env bash
# Run the test suite (installs first if needed). `.ci/run` calls exactly this.
set -uo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh || exit 1
bash scripts/setup-test-deps.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests - failing" >&2; exit 1; fi
exit $rc
