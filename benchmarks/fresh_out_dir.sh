# Sourced by the benchmark scripts after they set OUT: a new or empty folder, so that no earlier
# run's figures are written over (they would be, file by file, before a later step refused).
[[ -z $(ls -A "$OUT" 2>/dev/null) ]] || { echo "error: $OUT holds files (an earlier run's figures?): give a new or empty folder" >&2; exit 2; }
mkdir -p "$OUT"
