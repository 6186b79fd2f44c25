#!/usr/bin/env bash
# System packages the tests start for real: Orthanc with its DICOMweb plugin (Debian packages).
set -uo pipefail
if [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "[clinlens] installing orthanc + orthanc-dicomweb (Debian packages) for the DICOMweb tests"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
if ! $SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1; then
  echo "[clinlens] could not install orthanc/orthanc-dicomweb; the DICOMweb tests will fail (need root or sudo)" >&2
fi
exit 0
