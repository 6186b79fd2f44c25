#!/usr/bin/env bash
# System packages the tests start for real (Debian packages): Orthanc with its DICOMweb plugin, and
# headless Chromium for the OHIF viewer test (Playwright drives it; no browser download).
set -uo pipefail
if [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
   && command -v chromium-headless-shell >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "[clinlens] installing orthanc + orthanc-dicomweb + chromium-headless-shell (Debian packages) for the DICOMweb and viewer tests"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
if ! $SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb chromium-headless-shell >/dev/null 2>&1; then
  echo "[clinlens] could not install orthanc/orthanc-dicomweb/chromium-headless-shell; the DICOMweb and viewer tests will fail (need root or sudo)" >&2
fi
exit 0
