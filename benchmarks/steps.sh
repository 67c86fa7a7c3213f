# Sourced by the benchmark scripts (run from the repository root), whose last line is
#   steps "$0" "EVERY STEP" "DEFAULT STEPS" "$@"; exit
# -h or --help prints the script's header comment; a step the script does not offer is refused (exit 2) before
# any step runs; no argument runs the default steps. An argument may hold several steps ("r20 r56").
steps() {
  local script=benchmarks/$(basename "$1") every=$2 defaults=$3 part
  shift 3
  for part in $*; do
    case $part in
      -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$script"; exit 0 ;;
    esac
    if [[ " $every " != *" $part "* ]]; then
      echo "$script: no step '$part'; the steps are: $every (default: $defaults); --help describes them" >&2
      exit 2
    fi
  done
  for part in ${*:-$defaults}; do "$part"; done
}
