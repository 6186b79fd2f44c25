#!/usr/bin/env bash
# Set everything up and run the main job: install if needed, generate the sample studies if
# missing, and start the MONAI Label server with the clinlens app on 127.0.0.1:8000.
#   ./run.sh                      serve ./studies
#   ./run.sh demo                 replay a scripted clinician session, write out/demo/report.md
#   ./run.sh serve --port 8001    any `clinlens` subcommand and its options
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $# -eq 0 ]; then set -- serve; fi
exec .venv/bin/clinlens "$@"
