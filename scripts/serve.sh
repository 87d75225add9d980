#!/usr/bin/env bash
# The README's main command: index an image folder (incrementally) and serve it.
#
#   scripts/serve.sh IMAGE_FOLDER [--model NAME_OR_PATH] [--index-dir DIR] [--host HOST] [--port PORT]
#
# Creates .venv on first use (scripts/env.sh), runs `clip-index build` on the folder, then `clip-serve` on the index.
# The model defaults to $CLIPSEARCH_MODEL, else ViT-B-32 (downloaded and sha256-verified on first use); the index
# to $CLIPSEARCH_INDEX_DIR, else ~/.local/share/clip-search/index. Ctrl-C stops the server; rerunning only
# encodes new or changed images.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
root=$1
shift
model=${CLIPSEARCH_MODEL:-ViT-B-32}
index_dir=${CLIPSEARCH_INDEX_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/clip-search/index}
serve_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --index-dir) index_dir=$2; shift 2 ;;
    --host|--port) serve_args+=("$1" "$2"); shift 2 ;;
    *) echo "serve.sh: unknown option $1" >&2; usage ;;
  esac
done
[ -d "$root" ] || { echo "serve.sh: $root is not a folder" >&2; exit 2; }

scripts/env.sh
.venv/bin/clip-index build "$root" --index-dir "$index_dir" --model "$model"
exec .venv/bin/clip-serve --index-dir "$index_dir" --image-root "$root" "${serve_args[@]}"
