#!/usr/bin/env bash
# Optional: builds pillow-simd (Pillow with SIMD resize kernels) into a folder of its own, for
# data.decode.decoder=simplejpeg_pillow (docs/decode.md). The environment's Pillow stays installed, so pip's view
# of torchvision's "pillow" requirement does not change; training picks pillow-simd up only where this
# folder is first on PYTHONPATH:
#
#   scripts/install_pillow_simd.sh [DIR]        # default DIR: ~/.local/lib/imgtrain-pillow-simd
#   export PYTHONPATH=DIR${PYTHONPATH:+:$PYTHONPATH}
#   imgtrain train ... data.decode.decoder=simplejpeg_pillow
#
# It builds from source (several minutes on 2 cores) with AVX2 unless CC is set (CC="cc -msse4" for
# CPUs without AVX2). Needs a C compiler and libjpeg / zlib headers: installed with apt-get when run as
# root on Debian/Ubuntu. Not run by CI (see docs/decode.md for why).
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -*) echo "install_pillow_simd.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "install_pillow_simd.sh: at most one argument (DIR)" >&2; exit 2; }
dir="${1:-$HOME/.local/lib/imgtrain-pillow-simd}"
version="${PILLOW_SIMD_VERSION:-12.1.1.post0}"

if ! [ -e /usr/include/jpeglib.h ] || ! [ -e /usr/include/zlib.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      build-essential libjpeg-dev zlib1g-dev >/dev/null
  else
    echo "install_pillow_simd.sh: needs libjpeg and zlib headers (apt-get install libjpeg-dev zlib1g-dev)" >&2
    exit 1
  fi
fi

export CC="${CC:-cc -mavx2}"
python -m pip install -q --no-binary :all: --no-deps --upgrade --target "$dir" "pillow-simd==$version"
PYTHONPATH="$dir" python -c "import PIL, sys; assert PIL.__file__.startswith(sys.argv[1]), PIL.__file__" "$dir"
echo "pillow-simd $version installed in $dir; use it with: export PYTHONPATH=$dir\${PYTHONPATH:+:\$PYTHONPATH}"
