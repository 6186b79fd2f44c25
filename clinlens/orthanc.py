"""A throwaway Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) on loopback: the DICOMweb server
OHIF and MONAI Label's DICOMweb datastore talk to, for tests and local trials.

    with Orthanc(workdir) as o:
        o.store(files)                  # STOW-RS through dicomweb-client
        start_server(o.dicomweb_url)    # --studies http://127.0.0.1:<port>/dicom-web
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from clinlens.server import free_port, wait_until_ready

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = "apt-get install -y orthanc orthanc-dicomweb (scripts/setup-test-deps.sh does it)"


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    missing = [p for p in (ORTHANC_BIN, DICOMWEB_PLUGIN) if not os.path.exists(p)]
    return f"missing {', '.join(missing)}: {INSTALL_HINT}" if missing else None


class Orthanc:
    def __init__(self, workdir, port: int | None = None, timeout: float = 60):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = self.url + "/dicom-web"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        db = self.workdir / "db"
        return {
            "Name": "clinlens-orthanc", "StorageDirectory": str(db), "IndexDirectory": str(db),
            "HttpPort": self.port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": False, "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        }

    def start(self) -> "Orthanc":
        why = orthanc_available()
        if why:
            raise RuntimeError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = open(self.workdir / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            ready = lambda: requests.get(self.dicomweb_url + "/studies", timeout=2).status_code == 200  # noqa: E731
            wait_until_ready(self.proc, ready, self.timeout, "Orthanc", self.workdir / "orthanc.log", interval=0.3)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def client(self):
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb_url)

    def store(self, files) -> int:
        """STOW-RS the DICOM files; returns how many instances were sent."""
        import pydicom

        datasets = [pydicom.dcmread(str(f)) for f in files]
        self.client().store_instances(datasets)
        return len(datasets)

    def series(self, **filters) -> list[dict]:
        """QIDO-RS series search (DICOM JSON, as the datastore and OHIF see it)."""
        return self.client().search_for_series(search_filters=filters or None)
