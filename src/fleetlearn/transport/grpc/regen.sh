#!/usr/bin/env sh
# Regenerate fleetlearn_pb2.py / fleetlearn_pb2_grpc.py from fleetlearn.proto.
# Needs grpcio-tools (the `test` extra).  Run from anywhere:
#   sh src/fleetlearn/transport/grpc/regen.sh
# The generated stub imports its messages as a top-level module; it is rewritten
# to a package-relative import so the package works wherever it is installed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
cd "$here"
"$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. fleetlearn.proto
sed -i 's/^import fleetlearn_pb2 as fleetlearn__pb2$/from . import fleetlearn_pb2 as fleetlearn__pb2/' fleetlearn_pb2_grpc.py
grep -q '^from \. import fleetlearn_pb2 as fleetlearn__pb2$' fleetlearn_pb2_grpc.py
echo "regenerated: $here/fleetlearn_pb2.py fleetlearn_pb2.pyi fleetlearn_pb2_grpc.py"
