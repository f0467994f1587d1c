#!/bin/sh
# All 52 kill points of tests/faults (run, local sweep, Ray sweep); GRADFLOW_FAULTS_SEED picks the moments.
cd "$(dirname "$0")/../.." && GRADFLOW_FAULTS_FULL=1 exec python -m pytest -q -p no:randomly tests/faults "$@"
