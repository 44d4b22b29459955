#!/bin/bash
# session 56 call 1 ran session 55's prepared call unchanged, after its variants.py and session 53's:
exec bash benchmarks/results/session55-2026-12-07-h100/call3/run.sh
