#!/usr/bin/env bash
# Runs every fault campaign (the tests marked `campaign`: SIGKILLs, byte corruption,
# concurrent gc, Redis kills, ...) and prints one table of their figures at the end
# (trials, torn checkpoints, wrong restores, escaped exceptions, hangs, ...).
#
#   scripts/campaigns.sh            # reduced counts, as CI runs them inside the suite
#   scripts/campaigns.sh --full     # the full counts, for the figures (several minutes)
#   scripts/campaigns.sh --full -k sigkill
#
# Other arguments go to pytest. The table is also written to $CKPT_CAMPAIGN_REPORT
# (default: campaigns.md in the repository root; a path ending in .json gets JSON).
# The option is passed as one word (--campaign-report=PATH): pytest reads a separate
# word as a test path before the plugin that defines the option is loaded.
# The interpreter is .venv/bin/python (made by scripts/test.sh), or $VPY.
set -euo pipefail
cd "$(dirname "$0")/.."

VPY=${VPY:-.venv/bin/python}
report=${CKPT_CAMPAIGN_REPORT:-campaigns.md}
exec "$VPY" -m pytest -m campaign --campaign-report="$report" "$@"
