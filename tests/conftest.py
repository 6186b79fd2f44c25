"""Shared fixtures: generated studies and a real MONAI Label server on a free loopback port."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from clinlens.server import read_multipart, slicer_post  # noqa: E402,F401  (shared by the test modules)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small ops on 2 cores shared with other torch processes: 2 OpenMP threads ran 5-20x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random CLIP (tests/test_region_model.make_tiny_clip), loaded on CPU."""
    from test_region_model import make_tiny_clip

    from clinlens.models.clip import load_clip

    return load_clip(make_tiny_clip(tmp_path_factory.mktemp("tiny_clip")), device="cpu")


@pytest.fixture(scope="session")
def studies(tmp_path_factory):
    from clinlens.data.studies import make_studies

    root = tmp_path_factory.mktemp("studies")
    make_studies(root, n_chest=3, n_derm=2, n_ct=2, labelled_fraction=0.5, seed=7, chest_size=512,
                 ct_shape=(24, 96, 128), progress=False)
    return root


@pytest.fixture(scope="session")
def server(studies, tmp_path_factory):
    from clinlens.server import Server

    work = tmp_path_factory.mktemp("server")
    log = work / "server.log"
    with Server(studies, log_path=log, conf={"model_dir": work / "model"}) as s:
        s.tmp = tmp_path_factory.mktemp("client")
        yield s
    print(f"server log: {log}")

