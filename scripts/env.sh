# Sourced by every fedinspect entry script: makes sure torch==2.11.0 is in the cache (installing
# it once when missing) and exports what the tch build needs. Safe to source repeatedly.
_fedinspect_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$_fedinspect_root/scripts/install-torch.sh")" || {
  echo "fedinspect: could not install torch; run $_fedinspect_root/scripts/install-torch.sh and read its error" >&2
  return 1 2>/dev/null || exit 1
}
